"""The one budget search: which channels (and branches) to keep so that a cost model's cost falls by a goal.

The select pass (through vitcc.search.choose), method passes' provisional selections and `vitcc profile`
build selections with the same two functions: `select_uniform` (remove a fraction of every prunable group of
some kinds, under the graph's constraints) and `search_budget` (the smallest such fraction that removes a goal
fraction of a `CostModel`'s cost: params, MACs or predicted latency, weighing candidates by a `LossModel`).
Cost models read a selection by group-root id (`Selection.by_root`), the form `vitcc.ir.shapes` reads.

Method passes steer the search through `program.options` (see vitcc/passes/_common.py): `families` (groups
that share one threshold), `group_rate` (a per-group multiplier of the uniform fraction).

Depth pruning: the kind `branch` (vitcc.analysis.branches) makes every residual branch one unit that a selection
removes whole (`Selection.removed`; the groups inside a removed branch are left out of `kept`: they go
with it). Alone, branches are removed lowest score first (per unit of cost for a budget); with widths and
a budget, `search_budget` weighs removing branches against narrowing (`_search_with_branches`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any, Callable

import numpy as np
import torch

from vitcc.errors import VitccError
from vitcc.ir.groups import Group
from vitcc.ir.program import Program
from vitcc.ir.selection import BRANCH, MIN_KEEP, KeptByRoot, Selection
from vitcc.ir.spaces import find
from vitcc.search.cost import CostModel
from vitcc.search.loss import LossModel, loss_model, score_branches

__all__ = ["select_uniform", "search_budget", "smallest", "branch_order", "without_branches"]


def kept_of_kind(program: Program, keep: Mapping[str, Any], kind: str) -> int:
    """Channels kept over every group of one kind."""
    return sum(len(keep.get(g.name, range(g.size))) for g in program.groups if g.kind == kind)


# -- a uniform fraction ------------------------------------------------------------------------------------

def _count(n: int, frac: float, kind: str, align: int) -> int:
    k = max(MIN_KEEP[kind], n - int(frac * n + 1e-9))  # never remove more than the fraction asked
    if align > 1 and kind != "heads" and n >= align:
        k = min(n, max(align, int(round(k / align)) * align))
    return k


def select_uniform(program: Program, frac: float, kinds: set[str], align: int = 1,
                   scope: str = "uniform") -> Selection:
    """Remove `frac` of every prunable group of `kinds` (times its `group_rate`), the lowest scores first.

    Widths round to multiples of `align` (heads excepted); groups of a registered family, or with
    scope="global" of one kind, share one threshold; spaces tied by a fused reshape keep equal counts
    (or all stay whole when one of them cannot be pruned). Every group of `kinds` needs a score. With the
    kind `branch`, `frac` of the removable branches go too, the lowest scores first (vitcc.analysis.branches)."""
    keep = _select_widths(program, frac, kinds - {BRANCH}, align, scope)
    if BRANCH not in kinds:
        return keep
    order = branch_order(program)
    return without_branches(program, keep, order[:int(frac * len(order) + 1e-9)])


def branch_order(program: Program, per: dict[str, float] | None = None) -> list[str]:
    """Removable branches, lowest score first (divided by `per[name]`, e.g. the cost each removes alone);
    scores the branches that have none (`vitcc.search.loss.score_branches`)."""
    score_branches(program)
    names = [b.name for b in program.branches if b.prunable]
    value = {n: float(program.scores[n].sum()) / (max(per[n], 1e-30) if per else 1.0) for n in names}
    return sorted(names, key=value.__getitem__)


def without_branches(program: Program, keep: Selection, removed: Iterable[str]) -> Selection:
    """`keep` with the named branches removed whole, and the groups inside them left out (they go with them)."""
    removed = set(removed)
    gone = {g for b in program.branches if b.name in removed for g in b.groups}
    return Selection({n: v for n, v in keep.items() if n not in gone}, removed | keep.removed)


def _select_widths(program: Program, frac: float, kinds: set[str], align: int, scope: str) -> Selection:
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
    keep = Selection()
    for name, k in counts.items():
        order = torch.argsort(program.scores[name], descending=True, stable=True)[:k]
        keep[name] = np.sort(order.numpy())
    return keep


def _families(program: Program, groups: list[Group], scope: str) -> dict:
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


def _global_counts(program: Program, groups: list[Group], frac: float, align: int,
                   scope: str = "global") -> dict[str, int]:
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


# -- a budget ---------------------------------------------------------------------------------------------

def smallest(program: Program, kinds: set[str], align: int = 1, scope: str = "uniform") -> Selection:
    """The most that pruning `kinds` can remove: every group at its minimum, every removable branch gone."""
    keep = _select_widths(program, 0.999, kinds - {BRANCH}, align, scope)
    return without_branches(program, keep, [b.name for b in program.branches if b.prunable]) if BRANCH in kinds else keep


def search_budget(program: Program, goal: float, kinds: set[str], align: int, scope: str, cost: CostModel,
                  loss: LossModel | None = None) -> tuple[Selection, str]:
    """A selection that removes at least `goal` of the cost model's cost (against its dense cost), as little
    more as the widths allow; and how it was found.

    First the smallest uniform fraction that gets there. Widths move in steps (a block has a handful of
    heads; widths step by the alignment: a Swin head dim of 32 at align 16 is 32 or 16), so that fraction
    can overshoot by several points where a kind takes a step; then each set of the kinds that stepped
    keeps the widths of the largest fraction that fell short, the fraction of the other kinds is searched
    again, and the closest selection that still reaches the goal wins. With the kind `branch`, removing
    branches is weighed against narrowing (`_search_with_branches`).

    A cost model with `further_steps` > 0 also has each kind tried up to that many steps past the widths of
    the largest fraction that falls short, the other kinds searched again, and the candidate within
    OVERSHOOT of the goal that loses least (`loss`, default vitcc.search.loss.loss_model) is kept. Latency
    does: work that follows head counts (softmax, the attention's transposes) makes a head worth more
    latency than its MACs, so narrowing every kind alike is not the cheapest way to a latency.
    """
    further_steps, what = cost.further_steps, cost.what
    if goal <= 0:
        return select_uniform(program, 0.0, kinds, align, scope), "uniform"
    base = cost.dense()
    seen: dict[tuple, float] = {}

    def reduction(keep: Selection) -> float:  # costs are of compact shapes: kept counts, not which indices
        key = (frozenset(keep.removed), tuple(sorted((n, len(v)) for n, v in keep.items())))
        if key not in seen:
            seen[key] = 1 - cost(keep.by_root(program.groups)) / base if base > 0 else 0.0
        return seen[key]
    most = reduction(smallest(program, kinds, align, scope))
    if most < goal:
        raise VitccError(cost.out_of_reach(goal, most, kinds))
    if BRANCH in kinds and any(b.prunable for b in program.branches):
        return _search_with_branches(program, goal, kinds - {BRANCH}, align, scope, reduction, base, cost, what,
                                     further_steps, loss)
    return _search_widths(program, goal, kinds - {BRANCH}, align, scope, reduction, further_steps=further_steps,
                          loss=loss)


def _search_widths(program: Program, goal: float, kinds: set[str], align: int, scope: str,
                   reduction: Callable[[Selection], float], removed: Iterable[str] = (),
                   further_steps: int = 0, loss: Callable[[Selection], float] | None = None) -> tuple[Selection, str]:
    """The uniform-fraction search of `search_budget`, with the `removed` branches gone in every candidate
    (the goal must be reachable with them); with `further_steps`, the candidates weighed by `loss` (default
    a new vitcc.search.loss.loss_model)."""
    removed = list(removed)
    choose = lambda frac: without_branches(program, _select_widths(program, frac, kinds, align, scope), removed)
    lo, hi = _bisect(goal, lambda frac: reduction(choose(frac)))
    best, short, how = choose(hi), choose(lo), "uniform"

    def others_searched(held: tuple[str, ...], at: Selection) -> Selection | None:
        """`held` kinds as in `at`, the fraction of the other kinds searched again; None where it cannot reach."""
        kept = {n: v for n, v in at.items() if program.group(n).kind in held}
        rest = lambda frac: without_branches(program, Selection(
            {**_select_widths(program, frac, kinds - set(held), align, scope), **kept}), removed)
        if reduction(rest(0.999)) < goal:
            return None
        return rest(_bisect(goal, lambda frac: reduction(rest(frac)))[1])

    jumped = [k for k in sorted(kinds) if kept_of_kind(program, best, k) < kept_of_kind(program, short, k)]
    for held in _subsets(jumped):
        if len(held) == len(kinds):
            continue
        alt = others_searched(held, short)
        if alt is not None and goal <= reduction(alt) < reduction(best):
            best, how = alt, f"{' and '.join(held)} of a smaller fraction, other kinds searched again"
    if not further_steps or len(kinds) < 2:
        return best, how
    loss = loss_model(program) if loss is None else loss
    found = [(best, how)]
    for kind in sorted(kinds):
        frac = lo  # the steps are counted from the widths of the largest fraction that falls short
        for step in range(1, further_steps + 1):
            frac = _next_step(lambda f: kept_of_kind(program, choose(f), kind), frac)
            alt = None if frac is None else others_searched((kind,), choose(frac))
            if alt is None:
                break
            found.append((alt, f"{kind} {step} step(s) past the largest fraction short of the goal, other kinds "
                               "searched again"))
    close = _within_overshoot(found, goal, lambda f: reduction(f[0]))
    best, how = min(close, key=lambda f: loss(f[0]))
    return best, f"{how} (least loss of {len(close)} within {OVERSHOOT:.0%} of the goal)"


def _next_step(kept_at: Callable[[float], int], start: float) -> float | None:
    """The smallest fraction above `start` where `kept_at` (which falls as the fraction grows) falls below its
    value there; None if it never does."""
    now = kept_at(start)
    if kept_at(0.999) >= now:
        return None
    return _bisect(1.0, lambda frac: float(kept_at(frac) < now))[1]


def _search_with_branches(program: Program, goal: float, widths: set[str], align: int, scope: str,
                          reduction: Callable[[Selection], float], base: float, cost: CostModel,
                          what: str, further_steps: int = 0, loss: LossModel | None = None) -> tuple[Selection, str]:
    """Remove the k branches that lose least per unit of cost, and narrow the rest as far as the goal still
    needs; k is the one whose selection loses least (vitcc.search.loss.loss_model: the measured change of the
    output on the calibration batch, else normalised scores times the parameters they own, branches and
    channels in one unit). Without width kinds, the branches that reach the goal with the least total score
    (`_branches_for`)."""
    branches = [b.name for b in program.branches if b.prunable]
    alone = {n: base - cost(KeptByRoot({}, {n})) for n in branches}
    order = branch_order(program, per=alone)
    if not widths:
        names = _branches_for(program, goal, order, reduction, alone, base)
        return (without_branches(program, Selection(), names),
                f"{len(names)} of {len(order)} branches removed (least score for the {what})")
    loss = loss_model(program) if loss is None else loss
    found = []
    for k in _branch_counts(len(order)):
        only = without_branches(program, Selection(), order[:k])
        if reduction(only) >= goal:
            found.append((loss(only), k, only, "no narrowing"))
            break
        if reduction(without_branches(program, smallest(program, widths, align, scope), order[:k])) < goal:
            continue
        keep, how = _search_widths(program, goal, widths, align, scope, reduction, order[:k], further_steps, loss)
        found.append((loss(keep), k, keep, how))
    close = _within_overshoot(found, goal, lambda f: reduction(f[2]))
    lost, k, keep, how = min(close, key=lambda f: (f[0], f[1]))
    return keep, f"{k} of {len(order)} branches removed (least loss per {what}), widths: {how}"


def _branches_for(program: Program, goal: float, order: list[str], reduction: Callable[[Selection], float],
                  alone: dict[str, float], base: float) -> list[str]:
    """Branches whose removal reaches the goal with the least total score: the first of `order` that reach it,
    then while it lowers the total, one dropped or one swapped for a lower-scored one (a whole branch is a
    big step: the first that reach the goal can overshoot it by most of a branch).

    A candidate is costed (a walk over the whole graph) only where the sum of its branches' own reductions
    (`alone`) says it may reach the goal, give or take how far that sum has been from the costed figure so
    far: parameters and MACs add up exactly, so trying every swap costed the graph thousands of times."""
    score = {n: float(program.scores[n].sum()) for n in order}
    slack = 0.0

    def reaches(names: list[str]) -> bool:
        nonlocal slack
        additive = sum(alone[n] for n in names) / base if base > 0 else 0.0
        if additive + slack + 1e-9 < goal:
            return False
        got = reduction(without_branches(program, Selection(), names))
        slack = max(slack, additive - got)  # where the sum overstated a reduction, trust it less
        return got >= goal

    k = next(k for k in range(len(order) + 1) if reaches(order[:k]))
    chosen = order[:k]
    while True:  # candidates best first, each costed only until one reaches the goal
        drop = next((n for n in sorted(chosen, key=score.__getitem__, reverse=True)
                     if reaches([m for m in chosen if m != n])), None)
        if drop is not None:
            chosen = [m for m in chosen if m != drop]
            continue
        swaps = sorted((score[i] - score[o], o, i) for o in chosen for i in order
                       if i not in chosen and score[i] < score[o])
        swap = next(((o, i) for _, o, i in swaps if reaches([*(m for m in chosen if m != o), i])), None)
        if swap is None:
            return [n for n in order if n in chosen]
        chosen = [*(m for m in chosen if m != swap[0]), swap[1]]


OVERSHOOT = 0.02  # how far past the goal a selection may go (a whole branch is a big step) and still compete


def _within_overshoot(found: list, goal: float, reduction_of: Callable[[Any], float]) -> list:
    """The candidates (each reaching the goal) at most OVERSHOOT past it; else the closest one alone: as little
    more than the goal as the widths allow, what overshoots by more wins only when nothing is closer."""
    return [f for f in found if reduction_of(f) <= goal + OVERSHOOT] or [min(found, key=reduction_of)]


def _branch_counts(n: int) -> list[int]:
    """How many branches the weighing tries: every count up to 16, else a grid of about 17."""
    return list(range(n + 1)) if n <= 16 else sorted({*range(9), *np.linspace(0, n, 9).round().astype(int).tolist()})


def _bisect(goal: float, reduction_at: Callable[[float], float]) -> tuple[float, float]:
    """Uniform fractions lo < hi, 1e-9 apart, with reduction_at(lo) < goal <= reduction_at(hi)."""
    lo, hi = 0.0, 0.999
    for _ in range(30):
        mid = (lo + hi) / 2
        if reduction_at(mid) < goal:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _subsets(items: list) -> list[tuple]:
    return [c for r in range(1, len(items) + 1) for c in combinations(items, r)]
