"""Selections as plain data: the kept channel indices of each group, and the residual branches removed whole.

A `Selection` maps a group name to its kept indices; a group it does not name is kept whole. The select pass
(through vitcc.search.budget) builds it; rewrite, the masked reference, the report and `vitcc.compile(keep=...)`
read it. `KeptByRoot` is the same selection keyed by group-root id, the form the analysis reads.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field

import numpy as np

from vitcc.errors import VitccError
from vitcc.ir.groups import KINDS, Group
from vitcc.ir.spaces import find

BRANCH = "branch"  # the --prune kind of whole residual branches (vitcc.analysis.branches)
PRUNE_KINDS = (*KINDS, BRANCH)
MIN_KEEP = {"residual": 1, "heads": 1, "head_dim": 1, "mlp": 1, "rank": 1, "other": 1}

__all__ = ["BRANCH", "KINDS", "MIN_KEEP", "PRUNE_KINDS", "KeptByRoot", "Selection", "prune_kinds"]


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
    removed: set[str] = field(default_factory=set)  # branches removed whole (vitcc.analysis.branches)

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
