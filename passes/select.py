"""select: turn scores into kept indices, under the graph's constraints and the user's budget.

`sparsity` removes that fraction of every prunable group of the `prune` kinds (uniform), or with
`target=params|macs|latency` the uniform fraction is searched so that the compact model loses that fraction of
parameters, MACs or predicted eager latency (vitcc.latency: per-op latencies measured on this machine and
cached). `scope=global` (set by lamp) ranks channels of one kind across groups instead.
Counts tied by a fused reshape (q, k and v head dims of one qkv) stay equal; `align` rounds kept widths.

Method passes may also set (see passes/_common.py):
- `families`: group name -> (family, scores): the groups of one family share one threshold (dimap: a module
  family, vtp: all gates), honoured while the group's scores are still that tensor (a later pass that
  rescored the group cancels it);
- `group_rate`: group name -> multiplier of the uniform fraction (lowrank: lighter MLP pruning);
- `cost_reference`: (params, MACs) that params/macs targets are measured against (lowrank: the model
  before it factorised the attention projections).
"""
from __future__ import annotations

import numpy as np
import torch

from vitcc.cost import estimate
from vitcc.errors import VitccError
from vitcc.groups import KINDS
from vitcc.ir import Program
from vitcc.pipeline import Option, Pass, PassResult, register_pass
from vitcc.spaces import find

MIN_KEEP = {"residual": 1, "heads": 1, "head_dim": 1, "mlp": 1, "other": 1}


@register_pass("select", kind="structural")
class Select(Pass):
    """Kept indices from scores, under the graph's constraints and the budget (options override compile's)."""
    options_spec = (Option("sparsity", float, None, "fraction to remove, in [0, 1)"),
                    Option("prune", str, None, "group kinds to prune, comma-separated (then separate options "
                           "with ';')"),
                    Option("target", str, None, "what sparsity is a fraction of",
                           choices=("channels", "params", "macs", "latency")),
                    Option("align", int, None, "round kept widths to multiples of N (>= 1)"),
                    Option("scope", str, None, "a fraction per group, or one threshold per kind",
                           choices=("uniform", "global")))

    def run(self, program: Program) -> PassResult:
        opt = {**program.options, **self.options}
        if program.keep and not opt.get("sparsity"):
            return PassResult(modified=False, info={"selection": "given"})
        s = float(opt.get("sparsity", 0.0) or 0.0)
        if not 0.0 <= s < 1.0:
            raise VitccError(f"sparsity must be in [0, 1), got {s}")
        kinds = _kinds(opt.get("prune"))
        target = opt.get("target", "channels") or "channels"
        align = int(opt.get("align", 1) or 1)
        if opt.get("align") is not None and int(opt["align"]) < 1:
            raise VitccError(f"align must be >= 1 (1: no rounding), got {opt['align']}")
        scope = opt.get("scope", "uniform")
        for g in program.groups:
            if g.name not in program.scores:
                program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
        if target == "channels":
            program.keep = _select(program, s, kinds, align, scope)
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


def _kinds(prune) -> set[str]:
    if not prune:
        return set(KINDS) - {"other"}
    kinds = set(prune.split(",") if isinstance(prune, str) else prune)
    bad = kinds - set(KINDS)
    if bad:
        raise VitccError(f"unknown group kind(s) {sorted(bad)} in --prune; valid: {', '.join(KINDS)}")
    return kinds


def search_budget(program: Program, goal: float, kinds: set[str], align: int, scope: str, cost,
                  base: float | None = None, what: str = "cost") -> tuple[dict, str]:
    """Kept indices that remove at least `goal` of `cost` (a function of a selection by root id; measured
    against `base`, default the dense cost), as little more as the widths allow; and how it was found.

    First the smallest uniform fraction that gets there. Widths move in steps (a block has a handful of
    heads; widths step by the alignment: a Swin head dim of 32 at align 16 is 32 or 16), so that fraction
    can overshoot by several points where a kind takes a step; then each set of the kinds that stepped
    keeps the widths of the largest fraction that fell short, the fraction of the other kinds is searched
    again, and the closest selection that still reaches the goal wins.
    """
    choose = lambda frac: _select(program, frac, kinds, align, scope)
    if goal <= 0:
        return choose(0.0), "uniform"
    base = cost({}) if base is None else base
    reduction = lambda keep: 1 - cost(_by_root(program, keep)) / base if base > 0 else 0.0
    most = reduction(choose(0.999))
    if most < goal:
        raise VitccError(f"removing {goal:.0%} of the {what} is out of reach: pruning every group of the kinds "
                         f"{', '.join(sorted(kinds))} to its minimum removes {most:.0%}; ask for less or prune more kinds")
    lo, hi = _bisect(goal, lambda frac: reduction(choose(frac)))
    best, short, how = choose(hi), choose(lo), "uniform"
    jumped = [k for k in sorted(kinds) if _kept(program, best, k) < _kept(program, short, k)]
    for held in _subsets(jumped):
        if len(held) == len(kinds):
            continue
        kept = {n: v for n, v in short.items() if program.group(n).kind in held}
        rest = lambda frac, held=held, kept=kept: {**_select(program, frac, kinds - set(held), align, scope), **kept}
        if reduction(rest(0.999)) < goal:
            continue
        alt = rest(_bisect(goal, lambda frac: reduction(rest(frac)))[1])
        if goal <= reduction(alt) < reduction(best):
            best, how = alt, f"{' and '.join(held)} of a smaller fraction, other kinds searched again"
    return best, how


def _bisect(goal: float, reduction_at) -> tuple[float, float]:
    """Uniform fractions lo < hi, 1e-9 apart, with reduction_at(lo) < goal <= reduction_at(hi)."""
    lo, hi = 0.0, 0.999
    for _ in range(30):
        mid = (lo + hi) / 2
        if reduction_at(mid) < goal:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _kept(program: Program, keep: dict, kind: str) -> int:
    return sum(len(keep.get(g.name, range(g.size))) for g in program.groups if g.kind == kind)


def _subsets(items: list) -> list[tuple]:
    from itertools import combinations
    return [c for r in range(1, len(items) + 1) for c in combinations(items, r)]


def _by_root(program: Program, keep: dict) -> dict:
    return {find(program.group(n).space).id: np.asarray(v) for n, v in keep.items()}


def _count(n: int, frac: float, kind: str, align: int) -> int:
    k = max(MIN_KEEP[kind], n - int(frac * n + 1e-9))  # never remove more than the fraction asked
    if align > 1 and kind != "heads" and n >= align:
        k = min(n, max(align, int(round(k / align)) * align))
    return k


def _select(program: Program, frac: float, kinds: set[str], align: int, scope: str) -> dict[str, np.ndarray]:
    prunable = [g for g in program.groups if g.prunable and g.kind in kinds]
    rate = program.options.get("group_rate") or {}
    counts = {g.name: _count(g.size, min(0.999, frac * float(rate.get(g.name, 1.0))), g.kind, align)
              for g in prunable}
    if frac > 0:
        counts.update(_global_counts(program, prunable, frac, align, scope))
    by_root = {find(g.space).id: g for g in program.groups}
    for spaces in program.coupling.equal_counts:
        members = [by_root.get(find(s).id) for s in spaces]
        names = [m.name for m in members if m is not None]
        if len(names) == len(members) and all(n in counts for n in names):
            k = min(counts[n] for n in names)
            counts.update({n: k for n in names})
        else:  # one of them must stay whole (frozen, or not a channel group at all), so all of them do
            for n in names:
                counts.pop(n, None)
    keep = {}
    for name, k in counts.items():
        scores = program.scores[name]
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        keep[name] = np.sort(order.numpy())
    return keep


def _families(program: Program, groups, scope: str) -> dict:
    """Groups that share one threshold: families a method pass registered, else with scope=global one per kind."""
    registered = program.options.get("families") or {}
    fams: dict = {}
    for g in groups:
        entry = registered.get(g.name)
        if entry is not None and program.scores.get(g.name) is entry[1]:
            fams.setdefault(("family", entry[0]), []).append(g)
        elif scope == "global":
            fams.setdefault(("kind", g.kind), []).append(g)
    return fams


def _global_counts(program: Program, groups, frac: float, align: int, scope: str = "global") -> dict[str, int]:
    """One threshold per family over scores that are comparable across its groups (LAMP: one per kind)."""
    counts = {}
    for same in _families(program, groups, scope).values():
        allscores = torch.cat([program.scores[g.name] for g in same])
        n_remove = int(round(frac * len(allscores)))
        if n_remove == 0:
            continue
        # exactly the n_remove lowest scores of the family (ties broken by position, so equal scores, e.g.
        # untrained gates, never remove more than asked)
        lowest = torch.argsort(allscores, stable=True)[:n_remove]
        owner = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(same)])
        removed = torch.bincount(owner[lowest], minlength=len(same))
        for i, g in enumerate(same):
            counts[g.name] = _count(g.size, int(removed[i]) / g.size, g.kind, align)
    return counts
