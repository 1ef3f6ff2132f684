"""random: uniformly random scores, the floor every method must beat."""
from __future__ import annotations

import torch

from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass


@register_pass("random")
class RandomScore(Pass):
    """Uniformly random scores, the floor every method must beat."""
    writes_weights = False  # reads weights only (Pass.writes_weights)
    options_spec = (Option("seed", int, 0, "seed of the random scores"),)

    def run(self, program: Program) -> PassResult:
        gen = torch.Generator().manual_seed(int(self.option("seed")))
        for g in program.groups:
            program.scores[g.name] = torch.rand(g.size, generator=gen)
        return PassResult()
