"""The IR's types: a tensor's type is a tuple of axes, each a tuple of factors (ints and channel spaces,
vitcc.ir.spaces); `Coupling` is the analysis result as plain data. Helpers that read a node's recorded
shape and arguments live here too, so the op table, the analysis and the reference share them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

TType = tuple  # tuple[Axis, ...]
Rule = Callable[[Any, fx.Node], Any]  # (analyzer, node) -> the output type
aten = torch.ops.aten


@dataclass
class Frozen:
    node: str
    reason: str
    op: str = ""
    spaces: list = field(default_factory=list, repr=False)  # what the node froze; reported only if a group did


@dataclass
class Coupling:
    """The result of analysis: a type per node and per parameter, and what had to be frozen."""
    gm: fx.GraphModule
    types: dict[str, Any]
    params: dict[str, TType]
    frozen: list[Frozen] = field(default_factory=list)
    aliases: dict = field(default_factory=dict)
    equal_counts: list = field(default_factory=list)


def is_ttype(t: Any) -> bool:
    return isinstance(t, tuple) and all(isinstance(a, tuple) for a in t) and not any(
        isinstance(a, tuple) and a and isinstance(a[0], tuple) for a in t)


def attr_at(root: torch.nn.Module, target: str) -> Any:
    """The tensor or module a get_attr target (a dotted state-dict name) names in `root`."""
    return operator.attrgetter(target)(root)


def shape_of(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def multi_output(node: fx.Node) -> bool:
    """Whether the op returned several tensors (its tensor_meta is a list; one TensorMetadata is a NamedTuple)."""
    tm = node.meta.get("tensor_meta")
    return isinstance(tm, (list, tuple)) and not hasattr(tm, "shape")


def fixed_type(shape: tuple[int, ...]) -> TType:
    return tuple((s,) if s != 1 else () for s in shape)


def target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


