"""Indexing ops: select and slice along axes, gathers with index tensors, repeat_interleave, im2col."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.rulekit import arg, dim, is_param_node
from vitcc.ir.types import fixed_type, is_ttype, shape_of
from vitcc.ir.spaces import axis_size, decompose, find, freeze, fsize, normalize, spaces_of

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("indexing")


@family.coupling(aten.select)
def select(a, node: fx.Node) -> Any:
    """x[i] along an axis: a stacked channel factor (qkv[0]) selects per-index spaces; a fixed axis drops."""
    x = a.type_of(node.args[0])
    d = dim(node.args[1], len(x))
    factors = normalize(x[d])
    if len(factors) == 1 and not isinstance(factors[0], int):
        idx = node.args[2]
        return a.select(node.args[0], x, d, idx + fsize(factors[0]) if idx < 0 else idx)
    if spaces_of([x[d]]):
        a.freeze_types([(x[d],)], "index into a channel axis")
    return tuple(x[:d]) + tuple(x[d + 1:])


@family.coupling(aten.slice, aten.narrow)
def slice_(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = dim(arg(node, 1, "dim", 0), len(x))
    n_in, n_out = shape_of(node.args[0])[d], shape_of(node)[d]
    if n_in == n_out:
        return x
    step = arg(node, 4, "step", 1) if node.target.overloadpacket is aten.slice else 1
    if spaces_of([x[d]]) and is_param_node(node.args[0]) and len(normalize(x[d])) == 1 and step == 1:
        # a parameter's table sliced by position (pos_embed[:, :1], a bias table's rows): that axis indexes
        # positions, not channels; it becomes a fixed size (a channel tied to it later freezes, saying where)
        freeze(normalize(x[d])[0], a.why("a parameter sliced by index, kept whole"), fixed=True)
        return tuple(x[:d]) + ((n_out,),) + tuple(x[d + 1:])
    strided = _strided(a, x[d], node, n_out, step)
    if strided is None and step == 1:
        strided = _contiguous(x[d], _bounds(node, n_in))
    if strided is not None:
        return tuple(x[:d]) + (strided,) + tuple(x[d + 1:])
    if spaces_of([x[d]]):
        a.freeze_types([(x[d],)], "slice of a channel axis")
    return tuple(x[:d]) + ((n_out,),) + tuple(x[d + 1:])


def _strided(a, ax, node: fx.Node, n_out: int, step: int):
    """x[..., s::k] of a channel axis is one index of a (n/k, k) product: RoPE's even/odd pairs. The pair
    factor is fixed, the outer factor stays a channel space shared by every such slice."""
    start = arg(node, 2, "start", 0) or 0
    factors = normalize(ax)
    if node.target.overloadpacket is not aten.slice or step <= 1 or len(factors) != 1 \
            or isinstance(factors[0], int) or not (0 <= start < step):
        return None
    n = fsize(factors[0])
    if n % step or n_out != n // step:
        return None
    parts = decompose(factors[0], "product", [n // step, step])
    if parts is None:
        return None
    freeze(parts[1], a.why("interleaved pair factor"), fixed=True)
    return (parts[0],)


def _bounds(node: fx.Node, n: int) -> tuple[int, int] | None:
    """A slice's [start, end) as non-negative ints within the axis (None for symbolic bounds)."""
    start, end = arg(node, 2, "start", 0), arg(node, 3, "end", n)
    start, end = 0 if start is None else start, n if end is None else end
    if not (isinstance(start, int) and isinstance(end, int)):
        return None
    start, end = (min(max(v + n if v < 0 else v, 0), n) for v in (start, end))
    return (start, end) if start < end else None


def _contiguous(ax, bounds: tuple[int, int] | None):
    """x[a:b] of a channel axis is one part of a concatenation [0:a], [a:b], [b:n] (BEiT's relative position
    table: the interpolated distances, then the 3 class-token entries; a GLU's value and gate halves). Each
    part is a channel space of its own; rewrite moves the bounds to the compact parts. A slice that cuts
    across parts made earlier freezes."""
    factors = normalize(ax)
    if bounds is None or len(factors) != 1 or isinstance(factors[0], int):
        return None
    part = _part(factors[0], *bounds, make=True)
    return None if part is None else (part,)


def _part(space, start: int, end: int, make: bool = False):
    """The part of a space's concatenation that covers exactly [start, end), splitting a part further when
    `make` (slices taken one after another); None where [start, end) crosses parts."""
    r = find(space)
    if (start, end) == (0, r.size):
        return r
    if r.split is None:
        if not make:
            return None
        parts = decompose(r, "concat", [m for m in (start, end - start, r.size - end) if m])
        return parts[1 if start else 0]
    kind, parts = r.split
    offset = 0
    for p in parts if kind == "concat" else ():
        if offset <= start and end <= offset + p.size:
            return _part(p, start - offset, end - offset, make)
        offset += p.size
    return None


def _compact_start(space, start: int, ctx) -> int:
    """Where position `start` of a concatenated space lands once every part keeps only its kept channels."""
    r = find(space)
    offset, kept = 0, 0
    for p in r.split[1] if start and r.split is not None else ():
        if start < offset + p.size:
            return kept + _compact_start(p, start - offset, ctx)
        offset += p.size
        kept += ctx.size((p,))
    return kept


@family.rewrite(aten.slice)
def rewrite_slice(node: fx.Node, ctx) -> None:
    """A strided slice of a channel axis that ends at the axis' full size ends at its compact size; a
    contiguous slice of a channel concatenation takes its part's compact bounds."""
    x = ctx.types.get(node.args[0].name)
    if not is_ttype(x) or len(node.args) < 3:
        return
    d = dim(node.args[1], len(x))
    if not ctx.is_channel(x[d]):
        return
    if (arg(node, 4, "step", 1) or 1) == 1:
        factors = normalize(x[d])
        bounds = _bounds(node, axis_size(factors))
        part = None if bounds is None or len(factors) != 1 else _part(factors[0], *bounds)
        if part is None or part is find(factors[0]):
            return  # not a part of a concatenation (the slice froze its axis)
        start = _compact_start(factors[0], bounds[0], ctx)
        node.args = (node.args[0], node.args[1], start, start + ctx.size((part,)), *node.args[4:])
    elif len(node.args) >= 4 and isinstance(node.args[3], int) and node.args[3] >= axis_size(normalize(x[d])):
        node.args = (*node.args[:3], ctx.size(x[d]), *node.args[4:])


@family.coupling(aten.index)
def index(a, node: fx.Node) -> Any:
    """Indexing with one tensor along one axis (a relative position table, heads first or last): the
    gathered axis takes the index tensor's shape and is no channel; the other axes pass through."""
    x, indices = a.type_of(node.args[0]), list(node.args[1])
    pos = [k for k, i in enumerate(indices) if i is not None]
    if len(pos) != 1 or not isinstance(indices[pos[0]], fx.Node):
        a.freeze_types([x], "advanced indexing with several index tensors")
        return a.out_type()
    p = pos[0]
    for s in spaces_of([x[p]]) + spaces_of(a.type_of(indices[p]) or ()):
        freeze(s, a.why("gathered axis"), fixed=True)
    return tuple(x[:p]) + fixed_type(shape_of(indices[p]) or ()) + tuple(x[p + 1:])


@family.coupling(aten.index_select)
def index_select(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = dim(node.args[1], len(x))
    for s in spaces_of([x[d]]):
        freeze(s, a.why("gathered axis"), fixed=True)
    return tuple(x[:d]) + ((shape_of(node)[d],),) + tuple(x[d + 1:])


@family.coupling(aten.repeat_interleave)
def repeat_interleave(a, node: fx.Node) -> Any:
    """Each channel repeated r times in place: the axis becomes (channels, r), r a fixed factor (GQA's
    shared k/v heads). A repeat count given as a tensor, or no dim, freezes."""
    x = a.type_of(node.args[0])
    r, d = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if not is_ttype(x) or not isinstance(r, int) or d is None:
        return a.unknown(node, "repeat_interleave without a fixed count and dim")
    d = dim(d, len(x))
    return tuple(x[:d]) + (tuple(normalize(x[d])) + ((r,) if r != 1 else ()),) + tuple(x[d + 1:])


@family.coupling(aten.im2col)
def im2col(a, node: fx.Node) -> Any:
    """F.unfold: (N, C, H, W) -> (N, C*kh*kw, L). Channels pass through as the outer factor."""
    x = a.type_of(node.args[0])
    out = shape_of(node)
    if not is_ttype(x) or len(x) != 4 or out is None:
        return a.unknown(node)
    k = out[1] // max(1, axis_size(x[1]))
    return (x[0], tuple(normalize(x[1])) + ((k,) if k != 1 else ()), (out[2],) if out[2] != 1 else ())


@family.coupling(aten.col2im)
def col2im(a, node: fx.Node) -> Any:
    """F.fold: (N, C*kh*kw, L) -> (N, C, H, W), the inverse of im2col: C is the outer factor."""
    x = a.type_of(node.args[0])
    out = shape_of(node)
    if not is_ttype(x) or len(x) != 3 or out is None:
        return a.unknown(node)
    factors = normalize(x[1])
    k = axis_size(factors) // max(1, out[1])
    inner, n = 1, len(factors)
    while n > 0 and inner < k:
        n -= 1
        inner *= fsize(factors[n])
    if inner != k:
        return a.unknown(node, "col2im whose channels are not the outer factor")
    for f in factors[n:]:  # kernel positions (volo's attention weights come from a Linear): not channels
        if not isinstance(f, int):
            freeze(f, f"kernel positions of {a.why()}", fixed=True)
    return (x[0], tuple(factors[:n])) + fixed_type(tuple(out[2:]))


@family.coupling(aten.unfold)
def unfold_windows(a, node: fx.Node) -> Any:
    """Tensor.unfold(dim, size, step): sliding windows along one axis (halo attention's spatial blocks).
    The other axes pass through; `dim` becomes the window count and a window axis is appended."""
    x, out = a.type_of(node.args[0]), shape_of(node)
    if not is_ttype(x) or out is None or len(out) != len(x) + 1:
        return a.unknown(node)
    d = dim(arg(node, 1, "dimension"), len(x))
    if spaces_of([x[d]]):
        a.freeze_types([(x[d],)], "sliding windows along a channel axis")
    return tuple(x[:d]) + fixed_type((out[d],)) + tuple(x[d + 1:]) + fixed_type((out[-1],))
