"""random: uniformly random scores, the floor every method must beat."""
from __future__ import annotations

import torch

from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass


@register_pass("random")
class RandomScore(Pass):
    def run(self, program: Program) -> PassResult:
        gen = torch.Generator().manual_seed(int(self.options.get("seed", 0)))
        for g in program.groups:
            program.scores[g.name] = torch.rand(g.size, generator=gen)
        return PassResult()
