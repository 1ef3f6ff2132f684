"""magnitude: the Lp norm of everything a channel owns, summed over all members of its group."""
from __future__ import annotations


from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass
from vitcc.search.scores import group_norms


@register_pass("magnitude")
class Magnitude(Pass):
    """Group Lp norm (p=1 or 2, default 2), the uniform-magnitude baseline of the papers."""
    writes_weights = False  # reads weights only (Pass.writes_weights)
    options_spec = (Option("p", float, 2, "norm order > 0: 1 or 2", check=lambda p: p > 0),)

    def run(self, program: Program) -> PassResult:
        p = float(self.option("p"))
        cache: dict = {}
        for g in program.groups:
            program.scores[g.name] = group_norms(program, g, p, cache).pow(1.0 / p).float()
        return PassResult(info={"p": p})
