"""Selections: the kept channel indices of each group, and the one budget search behind them.

A `Selection` maps a group name to its kept indices; a group it does not name is kept whole. The
`select` pass, `--target latency` (vitcc.latency) and `vitcc profile` build selections with the same two
functions: `select_uniform` (remove a fraction of every prunable group of some kinds, under the graph's
constraints) and `search_budget` (the smallest such fraction that removes a goal fraction of a cost:
params, MACs or predicted latency). Costs are functions of a selection by group-root id
(`Selection.by_root`), the form the analysis (`vitcc.ir.kept_count`) reads.

Method passes steer the search through `program.options` (see passes/_common.py): `families` (groups
that share one threshold), `group_rate` (a per-group multiplier of the uniform fraction).

Depth pruning: the kind `branch` (vitcc.branches) makes every residual branch one unit that a selection
removes whole (`Selection.removed`; the groups inside a removed branch are left out of `kept`: they go
with it). Alone, branches are removed lowest score first (per unit of cost for a budget); with widths and
a budget, `search_budget` weighs removing branches against narrowing (`_search_with_branches`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .errors import VitccError
from .groups import KINDS, Group
from .spaces import find

BRANCH = "branch"  # the --prune kind of whole residual branches (vitcc.branches)
PRUNE_KINDS = (*KINDS, BRANCH)

if TYPE_CHECKING:  # ir imports this module for Program.keep
    from .ir import Program

__all__ = ["BRANCH", "MIN_KEEP", "PRUNE_KINDS", "KeptByRoot", "Selection", "prune_kinds", "select_uniform",
           "search_budget", "kept_of_kind"]

MIN_KEEP = {"residual": 1, "heads": 1, "head_dim": 1, "mlp": 1, "other": 1}

Cost = Callable[["KeptByRoot"], float]  # a cost of a selection by group-root id: of the kept counts (shapes) only


class KeptByRoot(dict):
    """Kept indices by group-root id (what the analysis reads), and the names of the branches removed whole."""

    def __init__(self, kept: Mapping[int, np.ndarray] | None = None, removed: Iterable[str] = ()):
        super().__init__(kept or {})
        self.removed = frozenset(removed)


def _indices(v: Iterable[int]) -> np.ndarray:
    return np.asarray(v if isinstance(v, np.ndarray) else list(v), dtype=np.int64).reshape(-1)


@dataclass
class Selection(MutableMapping):
    """Group name -> kept indices (int64 arrays, in the order given: select keeps them sorted).

    A mapping, so passes read and write it as `program.keep[name]`; the helpers turn it into what the
    analysis, reports and JSON want."""
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)  # branches removed whole (vitcc.branches)

    def __post_init__(self) -> None:
        self.kept = {name: _indices(v) for name, v in dict(self.kept).items()}
        self.removed = set(self.removed)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.kept[name]

    def __setitem__(self, name: str, indices: Iterable[int]) -> None:
        self.kept[name] = _indices(indices)

    def __delitem__(self, name: str) -> None:
        del self.kept[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)

    def __bool__(self) -> bool:  # a selection that only removes branches selects something
        return bool(self.kept or self.removed)

    def __repr__(self) -> str:
        removed = f", removed={sorted(self.removed)}" if self.removed else ""
        return f"Selection({ {n: len(v) for n, v in self.kept.items()} }{removed})"

    def count(self, group: Group) -> int:
        """How many channels of `group` are kept."""
        return len(self.kept[group.name]) if group.name in self.kept else group.size

    def by_root(self, groups: Iterable[Group]) -> KeptByRoot:
        """Kept indices by the id of each group's root space: what kept sizes and masks are computed from."""
        return KeptByRoot({find(g.space).id: self.kept[g.name] for g in groups if g.name in self.kept}, self.removed)

    def widths(self, groups: Iterable[Group], branches: Iterable = ()) -> dict[str, dict[str, int]]:
        """Per group kind: how many groups, and channels before and after (summed over the groups; a group
        inside a removed branch keeps none); with `branches`, their count before and after as kind `branch`."""
        branches = list(branches)
        gone = {n for b in branches if b.name in self.removed for n in b.groups}
        out: dict[str, dict[str, int]] = {}
        for g in groups:
            w = out.setdefault(g.kind, {"groups": 0, "before": 0, "after": 0})
            w["groups"] += 1
            w["before"] += g.size
            w["after"] += 0 if g.name in gone else self.count(g)
        if branches:
            out[BRANCH] = {"groups": len(branches), "before": len(branches),
                           "after": sum(b.name not in self.removed for b in branches)}
        return out

    def to_json(self) -> dict[str, list[int]]:
        """Group name -> kept indices; a removed branch -> [] (what `vitcc.compile(keep=...)` reads back)."""
        return {**{name: [int(i) for i in v] for name, v in self.kept.items()}, **{b: [] for b in sorted(self.removed)}}


def prune_kinds(prune: str | Iterable[str] | None) -> set[str]:
    """The group kinds `prune` names (comma-separated or a collection; `branch`: whole residual branches);
    default every kind but `other` (and `branch`: depth pruning is asked for)."""
    if not prune:
        return set(KINDS) - {"other"}
    kinds = set(prune.split(",") if isinstance(prune, str) else prune)
    bad = kinds - set(PRUNE_KINDS)
    if bad:
        raise VitccError(f"unknown group kind(s) {sorted(bad)} in --prune; valid: {', '.join(PRUNE_KINDS)}")
    return kinds


def kept_of_kind(program: "Program", keep: Mapping[str, Any], kind: str) -> int:
    """Channels kept over every group of one kind."""
    return sum(len(keep.get(g.name, range(g.size))) for g in program.groups if g.kind == kind)


# -- a uniform fraction ------------------------------------------------------------------------------------

def _count(n: int, frac: float, kind: str, align: int) -> int:
    k = max(MIN_KEEP[kind], n - int(frac * n + 1e-9))  # never remove more than the fraction asked
    if align > 1 and kind != "heads" and n >= align:
        k = min(n, max(align, int(round(k / align)) * align))
    return k


def select_uniform(program: "Program", frac: float, kinds: set[str], align: int = 1,
                   scope: str = "uniform") -> Selection:
    """Remove `frac` of every prunable group of `kinds` (times its `group_rate`), the lowest scores first.

    Widths round to multiples of `align` (heads excepted); groups of a registered family, or with
    scope="global" of one kind, share one threshold; spaces tied by a fused reshape keep equal counts
    (or all stay whole when one of them cannot be pruned). Every group of `kinds` needs a score. With the
    kind `branch`, `frac` of the removable branches go too, the lowest scores first (vitcc.branches)."""
    keep = _select_widths(program, frac, kinds - {BRANCH}, align, scope)
    if BRANCH not in kinds:
        return keep
    order = branch_order(program)
    return without_branches(program, keep, order[:int(frac * len(order) + 1e-9)])


def branch_order(program: "Program", per: dict[str, float] | None = None) -> list[str]:
    """Removable branches, lowest score first (divided by `per[name]`, e.g. the cost each removes alone);
    scores the branches that have none (`vitcc.branches.score_branches`)."""
    from .branches import score_branches
    score_branches(program)
    names = [b.name for b in program.branches if b.prunable]
    value = {n: float(program.scores[n].sum()) / (max(per[n], 1e-30) if per else 1.0) for n in names}
    return sorted(names, key=value.__getitem__)


def without_branches(program: "Program", keep: "Selection", removed: Iterable[str]) -> "Selection":
    """`keep` with the named branches removed whole, and the groups inside them left out (they go with them)."""
    removed = set(removed)
    gone = {g for b in program.branches if b.name in removed for g in b.groups}
    return Selection({n: v for n, v in keep.items() if n not in gone}, removed | keep.removed)


def _select_widths(program: "Program", frac: float, kinds: set[str], align: int, scope: str) -> Selection:
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


def _families(program: "Program", groups: list[Group], scope: str) -> dict:
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


def _global_counts(program: "Program", groups: list[Group], frac: float, align: int,
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

def smallest(program: "Program", kinds: set[str], align: int = 1, scope: str = "uniform") -> Selection:
    """The most that pruning `kinds` can remove: every group at its minimum, every removable branch gone."""
    keep = _select_widths(program, 0.999, kinds - {BRANCH}, align, scope)
    return without_branches(program, keep, [b.name for b in program.branches if b.prunable]) if BRANCH in kinds else keep


def search_budget(program: "Program", goal: float, kinds: set[str], align: int, scope: str, cost: Cost,
                  base: float | None = None, what: str = "cost", further_steps: int = 0) -> tuple[Selection, str]:
    """A selection that removes at least `goal` of `cost` (measured against `base`, default the dense
    cost), as little more as the widths allow; and how it was found.

    First the smallest uniform fraction that gets there. Widths move in steps (a block has a handful of
    heads; widths step by the alignment: a Swin head dim of 32 at align 16 is 32 or 16), so that fraction
    can overshoot by several points where a kind takes a step; then each set of the kinds that stepped
    keeps the widths of the largest fraction that fell short, the fraction of the other kinds is searched
    again, and the closest selection that still reaches the goal wins. With the kind `branch`, removing
    branches is weighed against narrowing (`_search_with_branches`).

    `further_steps` > 0 also tries each kind up to that many steps past the widths of the largest fraction
    that falls short, the other kinds searched again, and keeps the candidate within OVERSHOOT of the goal
    that loses least (vitcc.branches.BranchLoss). `--target latency` does: work that follows head counts
    (softmax, the attention's transposes) makes a head worth more latency than its MACs, so narrowing every
    kind alike is not the cheapest way to a latency.
    """
    if goal <= 0:
        return select_uniform(program, 0.0, kinds, align, scope), "uniform"
    base = cost(KeptByRoot()) if base is None else base
    seen: dict[tuple, float] = {}

    def reduction(keep: Selection) -> float:  # costs are of compact shapes: kept counts, not which indices
        key = (frozenset(keep.removed), tuple(sorted((n, len(v)) for n, v in keep.items())))
        if key not in seen:
            seen[key] = 1 - cost(keep.by_root(program.groups)) / base if base > 0 else 0.0
        return seen[key]
    most = reduction(smallest(program, kinds, align, scope))
    if most < goal:
        raise VitccError(f"removing {goal:.0%} of the {what} is out of reach: pruning every group of the kinds "
                         f"{', '.join(sorted(kinds))} to its minimum removes {most:.0%}; ask for less or prune more kinds")
    if BRANCH in kinds and any(b.prunable for b in program.branches):
        return _search_with_branches(program, goal, kinds - {BRANCH}, align, scope, reduction, base, cost, what,
                                     further_steps)
    return _search_widths(program, goal, kinds - {BRANCH}, align, scope, reduction, further_steps=further_steps)


def _search_widths(program: "Program", goal: float, kinds: set[str], align: int, scope: str,
                   reduction: Callable[[Selection], float], removed: Iterable[str] = (),
                   further_steps: int = 0, loss: Callable[[Selection], float] | None = None) -> tuple[Selection, str]:
    """The uniform-fraction search of `search_budget`, with the `removed` branches gone in every candidate
    (the goal must be reachable with them); with `further_steps`, the candidates weighed by `loss` (default
    a new vitcc.branches.BranchLoss)."""
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
    if loss is None:
        from .branches import BranchLoss
        loss = BranchLoss(program)
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


def _search_with_branches(program: "Program", goal: float, widths: set[str], align: int, scope: str,
                          reduction: Callable[[Selection], float], base: float, cost: Cost,
                          what: str, further_steps: int = 0) -> tuple[Selection, str]:
    """Remove the k branches that lose least per unit of cost, and narrow the rest as far as the goal still
    needs; k is the one whose selection loses least (vitcc.branches.BranchLoss: the measured change of the
    output on the calibration batch, else normalised scores times the parameters they own, branches and
    channels in one unit). Without width kinds, the branches that reach the goal with the least total score
    (`_branches_for`)."""
    from .branches import BranchLoss
    branches = [b.name for b in program.branches if b.prunable]
    alone = {n: base - cost(KeptByRoot({}, {n})) for n in branches}
    order = branch_order(program, per=alone)
    if not widths:
        names = _branches_for(program, goal, order, reduction, alone, base)
        return (without_branches(program, Selection(), names),
                f"{len(names)} of {len(order)} branches removed (least score for the {what})")
    loss = BranchLoss(program)
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


def _branches_for(program: "Program", goal: float, order: list[str], reduction: Callable[[Selection], float],
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
