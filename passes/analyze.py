"""analyze: derive coupled channel spaces and the groups users see, from the graph alone."""
from __future__ import annotations

from vitcc.coupling import analyze as analyze_graph
from vitcc.groups import build_groups
from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass


@register_pass("analyze", kind="structural")
class Analyze(Pass):
    def run(self, program: Program) -> PassResult:
        program.coupling = analyze_graph(program.gm, program.ops)
        program.groups = build_groups(program.coupling)
        seen, frozen = set(), []
        for f in program.coupling.frozen:
            if (f.node, f.reason) not in seen:
                seen.add((f.node, f.reason))
                frozen.append({"node": f.node, "op": f.op, "reason": f.reason})
        program.report["frozen"] = frozen
        return PassResult(modified=False, info={"groups": len(program.groups)})
