"""Compact sizes under a selection: how many positions of a factor, an axis or a node's shape are kept.

`keep` is a selection by group-root id (`Selection.by_root`, a `KeptByRoot`); `aliases` the copies a select
made of a stacked space (`Coupling.aliases`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from vitcc.ir.program import Program
from vitcc.ir.spaces import Axis, axis_kept, find, fsize, normalize
from vitcc.ir.types import is_ttype, shape_of


def kept_count(f: Any, keep: dict[int, np.ndarray], aliases: dict) -> int:
    """Compact size of a factor; a space split per index by a select takes the size of its copies."""
    if isinstance(f, int):
        return f
    r = find(f)
    if r.split is None and r in aliases:
        return kept_count(aliases[r][0], keep, aliases)
    if r.split is None:
        return len(keep.get(r.id, range(r.size)))
    kind, children = r.split
    counts = [kept_count(c, keep, aliases) for c in children]
    return int(sum(counts)) if kind == "concat" else int(np.prod(counts, dtype=np.int64))


def axis_count(axis: Axis, keep: dict[int, np.ndarray], aliases: dict) -> int:
    return int(np.prod([kept_count(f, keep, aliases) for f in normalize(axis)], dtype=np.int64))


def axis_mask(axis: Axis, keep: dict[int, np.ndarray], aliases: dict) -> np.ndarray | None:
    """Boolean keep-mask of an axis, or None when all of it is kept (or it cannot be told per position)."""
    factors = normalize(axis)
    if any(not isinstance(f, int) and find(f).split is None and find(f) in aliases for f in factors):
        return None
    size = int(np.prod([fsize(f) for f in factors], dtype=np.int64)) if factors else 1
    flat = axis_kept(factors, keep)
    if len(flat) == size:
        return None
    mask = np.zeros(size, dtype=bool)
    mask[flat] = True
    return mask


class CompactShapes:
    """Compact shapes of a captured graph's nodes under a selection (group-root id -> kept indices), for the
    op table's MAC counts and latency entries; nodes without a channel type keep their captured shape."""

    def __init__(self, program: Program, keep: dict):
        program.require("shapes", "coupling", why="counting compact shapes")
        self.coupling, self.keep, self.cache = program.coupling, keep, {}

    def axis(self, ax) -> int:
        return axis_count(ax, self.keep, self.coupling.aliases)

    def node(self, n: Any) -> tuple[int, ...] | None:
        if not isinstance(n, fx.Node):
            return None
        if n.name not in self.cache:
            orig = shape_of(n)
            t = self.coupling.types.get(n.name)
            if orig is not None and is_ttype(t) and len(t) == len(orig):
                self.cache[n.name] = tuple(self.axis(ax) for ax in t)
            else:
                self.cache[n.name] = orig
        return self.cache[n.name]
