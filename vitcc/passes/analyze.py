"""analyze: derive coupled channel spaces and the groups users see, from the graph alone."""
from __future__ import annotations

from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass
from vitcc.analysis.refresh import analyze_program


@register_pass("analyze", kind="structural")
class Analyze(Pass):
    writes_weights = False  # reads weights only (Pass.writes_weights)
    needs = frozenset({"shapes"})

    def run(self, program: Program) -> PassResult:
        analyze_program(program)
        return PassResult(modified=False, info={"groups": len(program.groups)})
