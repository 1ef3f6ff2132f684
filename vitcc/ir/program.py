"""The program a pass pipeline works on: a traced graph, its coupling analysis, scores and selection.

Analyses of the graph (`ANALYSES`: "shapes", the node tensor_meta; "coupling", the channel types) are valid
or marked stale: a pass that changes `gm` says which it preserved (`PassResult.preserved`) and the
manager (vitcc.pipeline.manager) recomputes the others before a pass that needs them. `coupling` is always the
analysis of `original`, the graph the groups, scores, selection and masked reference are expressed in;
it describes `gm` too while "coupling" is not in `stale` (until rewrite compacts `gm`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitcc.errors import VitccError
from vitcc.ir.groups import Group
from vitcc.ir.selection import Selection
from vitcc.ir.spaces import Axis, find, spaces_of
from vitcc.ir.types import Coupling

ANALYSES = frozenset({"shapes", "coupling"})


@dataclass
class Program:
    """Everything a pass reads or writes. Scores and selections are data here, never module attributes."""
    gm: fx.GraphModule
    example_inputs: tuple
    original: fx.GraphModule | None = None  # frozen copy of the traced model: the masked reference runs it
    coupling: Coupling | None = None  # analysis of `original`; of `gm` too while "coupling" is not stale
    groups: list[Group] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # group name -> score per index (CPU)
    keep: Selection = field(default_factory=Selection)  # group name -> kept indices (sorted)
    options: dict[str, Any] = field(default_factory=dict)  # sparsity, prune kinds, target, align, ...
    report: dict[str, Any] = field(default_factory=dict)
    ops: Any = None  # this compile's op table (vitcc.analysis.ops.OpTable: built-ins + user rules); the analysis sets the default
    stale: set[str] = field(default_factory=set)  # analyses (of ANALYSES) that no longer describe `gm`
    branches: list = field(default_factory=list)  # residual branches (vitcc.analysis.branches.Branch), with the coupling
    # storages `gm` still shares with `original` (a `working_copy`): written in place, they would change the
    # reference and the user's model too, so `own_tensors` copies them before any pass that may write weights
    shared: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.original is None:
            self.original = copy.deepcopy(self.gm)

    def shapes_recorded(self, macs: int) -> None:
        """`gm`'s tensor_meta was just recorded at the example inputs, and `macs` counted in that same run
        (by `pipeline.refresh`, or by verify's run of the compact graph): the shapes analysis holds."""
        for n in self.gm.graph.nodes:
            n.meta.pop("val", None)  # export's records describe the captured graph, not this one
        self.gm.meta["macs"] = macs
        self.stale.discard("shapes")

    def own_tensors(self) -> int:
        """Give `gm` its own copy of every tensor it still shares with `original`; how many were copied."""
        if not self.shared:
            return 0
        copied = 0
        for owner in self.gm.modules():
            for slots in (owner._parameters, owner._buffers):
                for name, t in slots.items():
                    if t is not None and t.untyped_storage().data_ptr() in self.shared:
                        own = t.detach().clone()
                        slots[name] = nn.Parameter(own, t.requires_grad) if isinstance(t, nn.Parameter) else own
                        copied += 1
        self.shared = frozenset()
        return copied

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "keep" and not isinstance(value, Selection):  # a pass may assign a plain dict
            value = Selection(value)
        super().__setattr__(name, value)

    def require(self, *analyses: str, why: str = "this") -> None:
        """Raise unless the named analyses describe `gm` now (not made stale by a pass that changed it)."""
        stale = sorted(set(analyses) & self.stale)
        if stale:
            raise VitccError(f"{why} needs the {' and '.join(stale)} analysis of the graph, but a pass changed the "
                             "graph since (after rewrite it is the compact graph): use it before rewrite, or on "
                             "program.original with program.coupling")

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def branch(self, name: str):
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(name)

    def removed_nodes(self, keep: Any) -> set[str]:
        """Nodes of `original` that the branches `keep` removes delete (keep: a Selection or KeptByRoot)."""
        names = set(getattr(keep, "removed", ()))
        return {n for b in self.branches if b.name in names for n in (*b.nodes, b.add)}

    def removed_params(self, keep: Any) -> set[str]:
        names = set(getattr(keep, "removed", ()))
        return {p for b in self.branches if b.name in names for p in b.params}

    def removed_outputs(self, keep: Any) -> set[str]:
        """The branch outputs the masked reference zeroes."""
        names = set(getattr(keep, "removed", ()))
        return {b.output for b in self.branches if b.name in names}

    def group_roots(self) -> set[int]:
        return {find(g.space).id for g in self.groups}

    def is_channel_axis(self, axis: Axis, roots: set[int] | None = None) -> bool:
        """Whether an axis carries a group's channels (directly, or through the copies a select made).
        `roots` (`group_roots()`) saves recomputing them when many axes are asked in a row."""
        roots = self.group_roots() if roots is None else roots
        aliases = self.coupling.aliases
        for leaf in spaces_of([axis]):
            r = find(leaf)
            copies = spaces_of([(aliases[r][0],)]) if r in aliases else []
            if r.id in roots or any(find(c).id in roots for c in copies):
                return True
        return False

    def keep_by_root(self):
        """The selection as the analysis reads it (a `KeptByRoot`: kept indices by root id, removed branches)."""
        return self.keep.by_root(self.groups)


def writes_in_place(graph: fx.Graph) -> bool:
    """Whether some op of the graph mutates a tensor (an in-place aten op): a value read from a run may
    then change later in the same run."""
    return any(getattr(getattr(n.target, "_schema", None), "is_mutable", False) for n in graph.nodes)


def working_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, frozenset[int]]:
    """A copy of `gm` (graph, modules, node meta) whose parameters and buffers share storage with gm's, and
    those storages. The copy's Parameters are its own objects (its gradients and requires_grad flags are not
    gm's); its tensor values are gm's until `Program.own_tensors`. Copying every weight of a ViT-B up front
    would cost more than all of select, rewrite, fold and dce together, and rewrite replaces most of them."""
    memo: dict[int, Any] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        memo[id(t)] = nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else t.detach()
    storages = frozenset(t.untyped_storage().data_ptr() for t in memo.values())
    return copy.deepcopy(gm, memo), storages


def is_impure(node) -> bool:
    """Only what writes matters: an in-place aten op (its schema mutates an argument) or the graph's ends.
    fx's default also keeps random ops, so a dead branch's dropout (p=0 in eval) would keep it alive."""
    if node.op in ("placeholder", "output"):
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable) or (node.op == "call_function" and schema is None
                                                              and node.target.__module__ not in ("_operator",))
