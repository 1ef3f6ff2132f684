"""The masked reference: the original graph with removed channels forced to zero.

Semantics (docs/ARCHITECTURE.md): a removed channel is zero wherever its space appears; a norm over a
space with removed channels takes its statistics over the kept channels only; attention keeps the
original scale (the original graph is run unchanged, so it does). Ops whose masked semantics differ from
running them on zeroed inputs say so in the op table (`OpInfo.masked`), as do ops that reach the same values
with less work (a linear computes its kept rows from its kept columns: the reference's GEMMs cost what the
compact model's do, while the weights stay the original's, indexed by the selection). A removed residual branch
(vitcc.analysis.branches) has its output zeroed (`zeroed`), so the add that puts it on the stream contributes nothing.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from vitcc.ir.types import Coupling, is_ttype
from vitcc.ir.shapes import axis_mask, kept_count
from vitcc.ir.program import writes_in_place
from vitcc.ir.spaces import find, spaces_of
from vitcc.analysis.ops import OpTable

aten = torch.ops.aten


class MaskedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, coupling: Coupling, keep: dict[int, np.ndarray], ops: OpTable,
                 zeroed: Iterable[str] = ()):
        super().__init__(gm)
        self.ops = ops
        self.zeroed = frozenset(zeroed)  # nodes whose output is zero: the outputs of removed branches
        self.masks: dict[str, list[np.ndarray | None]] = {}
        self._cache: dict = {}
        self._removed: dict = {}
        # a masked parameter is the same on every input: masked once per interpreter, unless the graph
        # writes tensors in place (then every run starts from the tensors as they are)
        self._constants: dict[str, torch.Tensor] | None = None if writes_in_place(gm.graph) else {}
        for name, t in coupling.types.items():
            if is_ttype(t):
                masks = [axis_mask(ax, keep, coupling.aliases) for ax in t]
                if any(m is not None for m in masks):
                    self.masks[name] = masks
        self._implied = {n.name for n in gm.graph.nodes if n.op == "get_attr" and self._zeros_implied(n)}
        self._clean: set[str] = set()  # nodes whose output this run is zero at every removed position
        self._spaces = {n.name: _pruned_spaces(coupling.types.get(n.name), keep, coupling.aliases)
                        for n in gm.graph.nodes}

    def _zeros_implied(self, param: fx.Node) -> bool:
        """Whether zeroing a weight is implied by zeroing around its readers: every reader is an aten.linear
        taking it as the weight, whose input is zeroed at (at least) the weight's removed columns and whose
        output at its removed rows. A finite weight then gives the same products unzeroed (0 * w = 0), so
        the copy is skipped (finiteness is checked when it is read); the weights are most of what a
        reference would otherwise copy."""
        masks = self.masks.get(param.name)
        if masks is None or len(masks) != 2 or not param.users:
            return False
        rows, cols = masks
        for u in param.users:
            if not (u.op == "call_function" and u.target is aten.linear.default and len(u.args) > 1
                    and u.args[1] is param and u.args[0] is not param and isinstance(u.args[0], fx.Node)):
                return False
            if not (self._zeroed(u.args[0], cols) and self._zeroed(u, rows)):
                return False
        return True

    def _zeroed(self, node: fx.Node, removed_of: np.ndarray | None) -> bool:
        """Whether the last axis of `node`'s output is zeroed wherever the keep-mask `removed_of` is False."""
        if removed_of is None:
            return True
        masks, meta = self.masks.get(node.name), node.meta.get("tensor_meta")
        if masks is None or masks[-1] is None or not hasattr(meta, "shape") or len(meta.shape) != len(masks):
            return False
        last = masks[-1]
        return len(last) == len(removed_of) and not np.any(~removed_of & last)

    def mask(self, name: str, like: torch.Tensor, dims: range | None = None) -> torch.Tensor | None:
        """The keep-mask of a node's output over `dims`, built once and broadcastable against it."""
        masks = self.masks.get(name)
        if masks is None or not isinstance(like, torch.Tensor) or len(masks) != like.dim():
            return None
        dims = tuple(dims if dims is not None else range(like.dim()))
        key = (name, dims, like.dtype, like.device)
        if key not in self._cache:
            out = torch.ones((), dtype=like.dtype, device=like.device)
            for d in dims:
                if masks[d] is not None:
                    shape = [1] * like.dim()
                    shape[d] = -1
                    out = out * torch.as_tensor(masks[d], dtype=like.dtype, device=like.device).reshape(shape)
            self._cache[key] = out
        return self._cache[key]

    def removed(self, name: str, like: torch.Tensor) -> list[torch.Tensor] | None:
        """Where a node's output lost channels: one bool mask per axis that lost some, shaped to broadcast
        against the output (never a mask of the output's full size), built once."""
        masks = self.masks.get(name)
        if masks is None or not isinstance(like, torch.Tensor) or len(masks) != like.dim():
            return None
        key = (name, like.device)
        if key not in self._removed:
            per_axis = []
            for d, m in enumerate(masks):
                if m is not None:
                    shape = [1] * like.dim()
                    shape[d] = -1
                    per_axis.append(torch.as_tensor(~m, dtype=torch.bool, device=like.device).reshape(shape))
            self._removed[key] = per_axis
        return self._removed[key]

    def kept_last(self, node: Any, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor | None:
        """The kept positions of the last axis of `node`'s output (of `shape`) where it lost some, else
        None: for an op that computes only those (the reference need not compute what it zeroes). On
        `device`, where the tensors they index are."""
        masks = self.masks.get(node.name) if isinstance(node, fx.Node) else None
        if masks is None or len(masks) != len(shape) or masks[-1] is None:
            return None
        last = masks[-1]
        if len(last) != shape[-1] or last.all():
            return None
        key = (node.name, "kept last", device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(np.flatnonzero(last), dtype=torch.long, device=device)
        return self._cache[key]

    def zero_where_removed(self, node: Any) -> bool:
        """Whether `node`'s output this run is zero at every removed position (see `_run_masked`)."""
        return isinstance(node, fx.Node) and node.name in self._clean

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._clean = set()
        return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out, clean = self._run_masked(n)
        if clean:
            self._clean.add(n.name)
        return out

    def _run_masked(self, n: fx.Node) -> tuple[Any, bool]:
        """The node's masked output, and whether it is zero at every removed position (an implied weight
        is not: only linears read it)."""
        if self._constants is not None and n.name in self._constants:
            return self._constants[n.name], n.name not in self._implied
        if n.name in self._implied:
            w = super().run_node(n)
            if bool(torch.isfinite(w.sum())):  # a sum is finite only if every entry is (else: zeroed below)
                if self._constants is not None:
                    self._constants[n.name] = w
                return w, False
        out = None
        info = self.ops.get(n.target) if n.op == "call_function" else None
        if info is not None and info.masked is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = info.masked(self, n, args, kwargs)
        if out is None:
            out = super().run_node(n)
        if n.name in self.zeroed:
            return torch.zeros_like(out), True
        if not self._spaces[n.name]:  # nothing removed anywhere in it
            return out, True
        if not isinstance(out, torch.Tensor):  # a tuple (unbind, split): clean where its parts re-index a clean input
            return out, self._reindexes_clean(n, [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
        source = self._aliased_input(n, out) if n.op == "call_function" else None
        view_of_clean = source is not None and self._keeps_zeros(n, source, out)
        removed = self.removed(n.name, out)
        if not removed or view_of_clean:  # (not removed: a fused axis it cannot tell per position, or another rank)
            return out, view_of_clean
        # a removed position is zero even where the op made it NaN (0/0 after masking): a fill, not a product;
        # in place where the op made a new tensor, else into a new one (a view must not write its source)
        fresh = n.op == "call_function" and source is None
        for i, where in enumerate(removed):
            out = out.masked_fill_(where, 0) if fresh or i else out.masked_fill(where, 0)
        if n.op == "get_attr" and self._constants is not None:
            self._constants[n.name] = out
        return out, True

    def _aliased_input(self, n: fx.Node, out: torch.Tensor) -> tuple[fx.Node, torch.Tensor] | None:
        """The input (node, tensor) whose storage `out` shares (a view, or an op that returned its input)."""
        ptr = out.untyped_storage().data_ptr()
        for arg in n.all_input_nodes:
            for t in pytree.tree_leaves(self.env.get(arg)):
                if isinstance(t, torch.Tensor) and (not out.numel() or t.untyped_storage().data_ptr() == ptr):
                    return arg, t
        return None

    def _reindexes_clean(self, n: fx.Node, outputs: list[torch.Tensor]) -> bool:
        """Whether every output of `n` (a tuple's parts) is a view of a clean input that keeps its zeros."""
        if n.op != "call_function" or not outputs:
            return False
        return all((src := self._aliased_input(n, t)) is not None and self._keeps_zeros(n, src, t) for t in outputs)

    def _keeps_zeros(self, n: fx.Node, source: tuple[fx.Node, torch.Tensor], out: torch.Tensor) -> bool:
        """Whether a view is zero at its removed positions already: it re-indexes an input that is (its
        removed positions are that input's: the same pruned spaces, each element read once, no broadcast).
        Eval dropout, transposes, reshapes and the q/k/v of an unbind are such views; copying them to fill
        zeros that are there cost the reference a third of its time."""
        node, t = source
        if node.name not in self._clean or not out.numel() or out.numel() > t.numel():
            return False
        if any(st == 0 and size > 1 for st, size in zip(out.stride(), out.shape)):
            return False  # a broadcast reads one element many times
        return self._spaces[n.name] <= self._spaces[node.name]


def _pruned_spaces(t: Any, keep: dict[int, np.ndarray], aliases: dict) -> frozenset[int]:
    """The classes of a node's type (a tensor's, or each of a tuple's) that lost positions; a fused axis
    that a select splits per index (`aliases`) stands for all its copies."""
    if is_ttype(t):
        leaves = [c for s in spaces_of(t) for c in aliases.get(find(s), [s])]
        return frozenset(find(c).id for c in spaces_of([leaves]) if kept_count(c, keep, aliases) < find(c).size)
    if isinstance(t, (tuple, list)):
        return frozenset().union(*(_pruned_spaces(x, keep, aliases) for x in t))
    return frozenset()


def run_masked(program, keep: dict[int, np.ndarray], *inputs: torch.Tensor) -> Any:
    with torch.no_grad():
        return masked_reference(program, keep).run(*inputs)


def masked_reference(program, keep: dict[int, np.ndarray]) -> MaskedInterpreter:
    """Build once, run on many inputs: the masks are computed on first use and kept."""
    return MaskedInterpreter(program.original, program.coupling, keep, program.ops,
                             zeroed=program.removed_outputs(keep))
