"""given-selection: an explicit selection (group name -> kept indices; a branch name -> [] removes it), checked
against the graph's constraints as select would check its own: `vitcc.compile(..., keep=)` and the widths a
latency table is measured at (vitcc.profiling)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.ir.spaces import find
from vitcc.pipeline.pass_base import Pass, PassResult


class GivenSelection(Pass):
    """Not registered: `--passes` cannot name it; compile(keep=) and the latency tables' grid points put it
    before select, which then keeps what it set."""
    name = "given-selection"
    writes_weights = False  # writes the selection only (Pass.writes_weights)

    def __init__(self, keep: dict[str, Sequence[int]]):
        super().__init__()
        self.keep = keep

    def run(self, program: Program) -> PassResult:
        names = {g.name for g in program.groups}
        branches = {b.name: b for b in program.branches}
        unknown = set(self.keep) - names - set(branches)
        if unknown:
            raise VitccError(f"selection names unknown groups {sorted(unknown)[:5]}; see `vitcc inspect`")
        for name in set(self.keep) & set(branches):  # a branch is one unit: [] removes it, [0] keeps it
            idx = set(self.keep[name])
            if not idx <= {0}:
                raise VitccError(f"branch {name} is one unit: keep [] removes it, [0] keeps it; got {sorted(idx)[:5]}")
            if not idx:
                if branches[name].frozen:
                    raise VitccError(f"branch {name} cannot be removed: {branches[name].frozen}")
                program.keep.removed.add(name)
        for name, idx in ((n, i) for n, i in self.keep.items() if n not in branches):
            g = program.group(name)
            idx = np.unique(np.asarray([int(i) for i in idx], dtype=np.int64))  # ints, ranges, tensors on any device
            if g.frozen is not None and len(idx) != g.size:
                raise VitccError(f"group {name} is frozen ({g.frozen}) and cannot be pruned")
            program.keep[name] = idx
        by_root = {find(g.space).id: g for g in program.groups}
        for spaces in program.coupling.equal_counts:
            tied = [by_root[find(s).id] for s in spaces if find(s).id in by_root]
            counts = {len(program.keep.get(g.name, range(g.size))) for g in tied}
            if len(tied) < len(spaces):  # a partner that is no group keeps its full size
                counts |= {s.size for s in spaces}
            if len(counts) > 1:
                raise VitccError("groups " + ", ".join(g.name for g in tied) + " share one fused reshape and "
                                 "must keep the same number of channels")
        for name in program.keep.removed:  # the groups of a removed branch go with it
            for g in program.branch(name).groups:
                program.keep.pop(g, None)
        return PassResult()
