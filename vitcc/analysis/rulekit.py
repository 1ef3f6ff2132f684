"""What the op table's coupling rules build types with: tying, splitting and tagging axes.

Rules receive the analyzer (vitcc.analysis.coupling.Analyzer) as their first argument; these helpers take
it the same way, so neither the rules nor this module import the analyzer.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from vitcc.ir.spaces import Axis, decompose, find, freeze, fsize, spaces_of
from vitcc.ir.types import fixed_type, is_ttype

def tag(axis: Axis, name: str) -> None:
    for s in spaces_of([axis]):
        find(s).tags.add(name)


def is_param_node(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def flatten_types(t: Any):
    if t is None:
        return
    if is_ttype(t):
        yield t
    elif isinstance(t, (list, tuple, dict)):
        for x in (t.values() if isinstance(t, dict) else t):
            yield from flatten_types(x)


def spatial_through(a, node: fx.Node, x, out: list, pointwise: bool) -> None:
    """Spatial axes of a per-channel window op (conv, pool, resample) that carry spaces (a state or token axis
    moved there): a pointwise op passes them, a window mixes neighbours, so they freeze; over a tensor computed
    from parameters alone (a position table resampled to the grid) they are positions. Never dropped."""
    for i in range(2, len(x)):
        if spaces_of([x[i]]):
            if pointwise:
                out[i] = x[i]
            elif a.constant(node.args[0]):  # a window over a table of parameters (a resampled position table)
                for s in spaces_of([x[i]]):
                    freeze(s, f"positions of {a.why()}", fixed=True)
            else:
                a.freeze_types([(x[i],)], "window over a channel axis")


def regroup(a, flat: list, sizes) -> tuple | None:
    """Lay factors (outermost first) out as axes of the given sizes, splitting a space into a product where an
    axis boundary cuts it; None where the sizes do not align with the factors."""
    flat, out = list(flat), []
    for n in sizes:
        ax: list = []
        while flat and prod(ax) < n:
            f = flat.pop(0)
            need = n // prod(ax)
            if n % prod(ax) == 0 and fsize(f) > need and fsize(f) % need == 0:
                pieces = [need, fsize(f) // need]
                parts = pieces if isinstance(f, int) else decompose(f, "product", pieces)
                if parts is None:
                    a.freeze_types(((f,),), a.why("reshape splits an already decomposed space"))
                    parts = pieces
                ax.append(parts[0])
                flat.insert(0, parts[1])
            else:
                ax.append(f)
        if prod(ax) != n:
            return None
        out.append(tuple(ax))
    return tuple(out)


def prod(fs) -> int:
    p = 1
    for f in fs:
        p *= fsize(f)
    return p


def out_fixed(node: fx.Node) -> Any:
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None
    if hasattr(tm, "shape"):
        return fixed_type(tuple(tm.shape))
    if isinstance(tm, (list, tuple)):
        return type(tm)(fixed_type(tuple(m.shape)) if hasattr(m, "shape") else None for m in tm)
    return None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def named_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An aten op's argument by its schema name, positional or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    for i, a in enumerate(schema.arguments if schema is not None else ()):
        if a.name == name:
            return node.args[i] if i < len(node.args) else default
    return default


def dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


