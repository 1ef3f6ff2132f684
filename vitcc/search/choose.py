"""From the select options to a selection: the one place that wires a cost model, a loss model and the budget
search together. The select pass calls it; so do method passes that need what select would keep now.

`sparsity` removes that fraction of every prunable group of the `prune` kinds (uniform), or with
`target=params|macs|latency` the budget search finds the selection that removes that fraction of the target's
cost model. Groups nobody scored get their magnitude (vitcc.search.scores), branches what they lose
(vitcc.search.loss), so nothing is ranked by position.
"""
from __future__ import annotations

from typing import Any

import torch

from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.ir.selection import BRANCH, Selection, prune_kinds
from vitcc.search.budget import search_budget, select_uniform
from vitcc.search.cost import AnalyticCost, CostModel
from vitcc.search.latency_table import TableCost
from vitcc.search.loss import score_branches
from vitcc.search.scores import group_norms

TARGETS = ("channels", "params", "macs", "latency")


def cost_model(program: Program, target: str) -> CostModel:
    """The cost model a `--target` names."""
    if target in ("params", "macs"):
        ref = program.options.get("cost_reference")
        return AnalyticCost(program, target, None if ref is None else ref[0 if target == "params" else 1])
    if target == "latency":
        table = program.options.get("latency_table")
        if table is None:  # vitcc.compile profiles one (vitcc.profiling.table_for); a bare pipeline is given one
            raise VitccError("target='latency' needs a latency table in the select options (latency_table=): "
                             "`vitcc.compile(..., target='latency')` measures one, or pass one from `vitcc profile "
                             "MODEL -o TABLE.json`")
        return TableCost(program, table, program.options.get("latency_table_source"))
    raise VitccError(f"unknown target {target!r}; use {', '.join(TARGETS)}")


def choose(program: Program, options: dict[str, Any]) -> tuple[Selection, dict[str, Any]]:
    """The selection the options ask for, and what the report should say about how it was found."""
    s = float(options.get("sparsity", 0.0) or 0.0)
    if not 0.0 <= s < 1.0:
        raise VitccError(f"sparsity must be in [0, 1), got {s}")
    kinds = prune_kinds(options.get("prune"))
    target = options.get("target", "channels") or "channels"
    if target not in TARGETS:
        raise VitccError(f"unknown target {target!r}; use {', '.join(TARGETS)}")
    align = int(options.get("align", 1) or 1)
    if options.get("align") is not None and int(options["align"]) < 1:
        raise VitccError(f"align must be >= 1 (1: no rounding), got {options['align']}")
    scope = options.get("scope", "uniform")
    _score_what_nobody_scored(program, kinds)
    if target == "channels":
        return select_uniform(program, s, kinds, align, scope), {}
    cost = cost_model(program, target)
    with cost.measuring():
        keep, how = search_budget(program, s, kinds, align, scope, cost)
        report = cost.report(keep.by_root(program.groups))
        for detail in report.values():  # a measured model's own record says how its selection was found too
            detail.setdefault("selection", how)
        return keep, {"selection": how, **report}


def _score_what_nobody_scored(program: Program, kinds: set[str]) -> None:
    if BRANCH in kinds:  # a branch scores what its channels score: never by position
        cache: dict = {}
        for g in program.groups:
            if g.name not in program.scores:
                program.scores[g.name] = group_norms(program, g, 2.0, cache).sqrt().float()
        score_branches(program)
    for g in program.groups:
        if g.name not in program.scores:
            program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
