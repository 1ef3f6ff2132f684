"""lamp: layer-adaptive magnitude scores (Lee et al., ICLR 2021), comparable across groups.

For a group whose channel energies sorted ascending are e_1 <= ... <= e_n, channel u scores
e_u / sum_{v >= u} e_v. Scores are comparable across groups, so `lamp` asks select for one global
threshold instead of a uniform per-group fraction.
"""
from __future__ import annotations

import torch

from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass

from vitcc.search.scores import group_norms


@register_pass("lamp")
class Lamp(Pass):
    """Layer-adaptive magnitude scores, ranked with one global threshold per kind."""
    writes_weights = False  # reads weights only (Pass.writes_weights)

    def run(self, program: Program) -> PassResult:
        cache: dict = {}
        for g in program.groups:
            energy = group_norms(program, g, 2.0, cache)
            order = torch.argsort(energy)
            sorted_e = energy[order]
            tail = torch.flip(torch.cumsum(torch.flip(sorted_e, [0]), 0), [0]).clamp_min(1e-30)
            score = torch.empty_like(energy)
            score[order] = sorted_e / tail
            program.scores[g.name] = score.float()
        program.options.setdefault("scope", "global")
        return PassResult()
