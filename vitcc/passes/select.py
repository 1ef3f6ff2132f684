"""select: turn scores into kept indices, under the graph's constraints and the user's budget.

`sparsity` removes that fraction of every prunable group of the `prune` kinds (uniform), or with
`target=params|macs|latency` the uniform fraction is searched so that the compact model loses that fraction of
parameters, MACs or predicted latency (a latency table, vitcc.search.latency_table: measured on the device,
given or profiled by vitcc.compile). `scope=global` (set by lamp) ranks channels of one kind across groups instead.
Counts tied by a fused reshape (q, k and v head dims of one qkv) stay equal; `align` rounds kept widths.
The pass only reads its options: vitcc.search.choose wires the target's cost model, the loss model and the
budget search (vitcc.search.budget) together, for this pass and for methods that need a provisional selection.
With the kind `branch` (depth pruning) residual branches are removed whole: each scores what its channels
score (groups nobody scored get their magnitude), or with calibration data the change its removal makes
to the output (vitcc.search.loss.score_branches).

Method passes may also set (see vitcc/passes/_common.py):
- `families`: group name -> (family, scores): the groups of one family share one threshold (dimap: a module
  family, vtp: all gates), honoured while the group's scores are still that tensor (a later pass that
  rescored the group cancels it);
- `group_rate`: group name -> multiplier of the uniform fraction (lowrank: lighter MLP pruning);
- `cost_reference`: (params, MACs) that params/macs targets are measured against (lowrank: the model
  before it factorised the attention projections).
"""
from __future__ import annotations

from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass
from vitcc.search.choose import choose


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
        program.keep, found = choose(program, opt)
        program.report.update(found)
        return PassResult(info={"sparsity": float(opt.get("sparsity", 0.0) or 0.0),
                                "target": opt.get("target", "channels") or "channels"})
