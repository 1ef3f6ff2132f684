"""select: turn scores into kept indices, under the graph's constraints and the user's budget.

`sparsity` removes that fraction of every prunable group of the `prune` kinds (uniform), or with
`target=params|macs|latency` the uniform fraction is searched so that the compact model loses that fraction of
parameters, MACs or predicted eager latency (vitcc.latency: per-op latencies measured on this machine and
cached). `scope=global` (set by lamp) ranks channels of one kind across groups instead.
Counts tied by a fused reshape (q, k and v head dims of one qkv) stay equal; `align` rounds kept widths.
The search itself is vitcc.selection's (`select_uniform`, `search_budget`), shared with `vitcc profile`.
With the kind `branch` (depth pruning) residual branches are removed whole: each scores what its channels
score (groups nobody scored get their magnitude), or with calibration data the change its removal makes
to the output (vitcc.branches.score_branches).

Method passes may also set (see passes/_common.py):
- `families`: group name -> (family, scores): the groups of one family share one threshold (dimap: a module
  family, vtp: all gates), honoured while the group's scores are still that tensor (a later pass that
  rescored the group cancels it);
- `group_rate`: group name -> multiplier of the uniform fraction (lowrank: lighter MLP pruning);
- `cost_reference`: (params, MACs) that params/macs targets are measured against (lowrank: the model
  before it factorised the attention projections).
"""
from __future__ import annotations

import torch

from vitcc.cost import estimate
from vitcc.errors import VitccError
from vitcc.ir import Program
from vitcc.pipeline import Option, Pass, PassResult, register_pass
from vitcc.branches import score_branches
from vitcc.selection import BRANCH, prune_kinds, search_budget, select_uniform

from .magnitude import group_norms


@register_pass("select", kind="structural")
class Select(Pass):
    """Kept indices from scores, under the graph's constraints and the budget (options override compile's)."""
    writes_weights = False  # reads weights only (Pass.writes_weights)
    options_spec = (Option("sparsity", float, None, "fraction to remove, in [0, 1)"),
                    Option("prune", str, None, "group kinds to prune, comma-separated (then separate options "
                           "with ';')"),
                    Option("target", str, None, "what sparsity is a fraction of",
                           choices=("channels", "params", "macs", "latency")),
                    Option("align", int, None, "round kept widths to multiples of N (>= 1)"),
                    Option("scope", str, None, "a fraction per group, or one threshold per kind",
                           choices=("uniform", "global")))
    needs = frozenset({"shapes", "coupling"})

    def run(self, program: Program) -> PassResult:
        opt = {**program.options, **self.options}
        if program.keep and not opt.get("sparsity"):
            return PassResult(modified=False, info={"selection": "given"})
        s = float(opt.get("sparsity", 0.0) or 0.0)
        if not 0.0 <= s < 1.0:
            raise VitccError(f"sparsity must be in [0, 1), got {s}")
        kinds = prune_kinds(opt.get("prune"))
        target = opt.get("target", "channels") or "channels"
        align = int(opt.get("align", 1) or 1)
        if opt.get("align") is not None and int(opt["align"]) < 1:
            raise VitccError(f"align must be >= 1 (1: no rounding), got {opt['align']}")
        scope = opt.get("scope", "uniform")
        if BRANCH in kinds:  # a branch scores what its channels score: never by position
            cache: dict = {}
            for g in program.groups:
                if g.name not in program.scores:
                    program.scores[g.name] = group_norms(program, g, 2.0, cache).sqrt().float()
            score_branches(program)
        for g in program.groups:
            if g.name not in program.scores:
                program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
        if target == "channels":
            program.keep = select_uniform(program, s, kinds, align, scope)
        elif target in ("params", "macs"):
            which = 0 if target == "params" else 1
            ref = program.options.get("cost_reference")
            cost = lambda keep: estimate(program, keep)[which]
            program.keep, how = search_budget(program, s, kinds, align, scope, cost,
                                              ref[which] if ref is not None else None, target)
            program.report["selection"] = how
        elif target == "latency":
            from vitcc.latency import select_for_latency  # measures ops missing from the cache
            program.keep, program.report["latency_model"] = select_for_latency(program, s, kinds, align, scope)
        else:
            raise VitccError(f"unknown target {target!r}; use channels, params, macs or latency")
        return PassResult(info={"sparsity": s, "target": target})
