"""Keeping a program's analyses current: recompute the shapes (a run of the graph) and the coupling (types,
groups, residual branches, what froze) that a pass made stale.
"""
from __future__ import annotations

from vitcc.analysis.branches import find_branches
from vitcc.analysis.coupling import analyze as analyze_graph
from vitcc.analysis.groups import build_groups
from vitcc.analysis.ops import default_table
from vitcc.errors import VitccError
from vitcc.frontend.capture import propagate_shapes
from vitcc.ir.program import ANALYSES, Program
from vitcc.ir.spaces import find, leaves


def refresh(program: Program, *analyses: str) -> None:
    """Recompute analyses of `program.gm` (default: the stale ones), shapes before coupling.

    shapes: run the graph on the example inputs (node tensor_meta, and `gm.meta["macs"]` counted in the same
    run; export's stale `val` records dropped);
    coupling: the analyzer's types, the groups, and `report["frozen"]`."""
    todo = set(analyses) if analyses else set(program.stale)
    unknown = todo - ANALYSES
    if unknown:
        raise VitccError(f"unknown analysis {sorted(unknown)[0]!r}; analyses: {', '.join(sorted(ANALYSES))}")
    if "shapes" in todo:
        for n in program.gm.graph.nodes:
            n.meta.pop("val", None)
        program.shapes_recorded(propagate_shapes(program.gm, program.example_inputs))
    if "coupling" in todo:
        analyze_program(program)
    program.stale -= todo


def analyze_program(program: Program) -> None:
    """The coupling analysis of `program.gm`, its groups and residual branches, and the ops that froze a group
    (once per node).

    A node that froze only what later turned out not to be channels (a buffer's token axis tied to the input,
    softmax over an axis a later contraction fixes) cost nothing and is not reported."""
    if program.ops is None:
        program.ops = default_table()
    program.coupling = analyze_graph(program.gm, program.ops)
    program.groups = build_groups(program.coupling)
    program.branches = find_branches(program.gm, program.coupling.types, program.groups)
    frozen_roots = {id(find(g.space)) for g in program.groups if g.frozen is not None}
    seen, frozen = set(), []
    for f in program.coupling.frozen:
        if not any(id(leaf) in frozen_roots for s in f.spaces for leaf in leaves(s)):
            continue
        if (f.node, f.reason) not in seen:
            seen.add((f.node, f.reason))
            frozen.append({"node": f.node, "op": f.op, "reason": f.reason})
    program.report["frozen"] = frozen
    program.stale.discard("coupling")
