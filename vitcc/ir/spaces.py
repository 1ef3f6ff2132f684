"""Channel spaces: the abstract index sets that tensor axes are laid out on.

A tensor axis is an ordered product of factors (outermost first). A factor is either a fixed size (an
``int``: batch, tokens, the ``2x2`` of a patch merge) or a :class:`Space`. Spaces live in a union-find:
two spaces that must be pruned together are one class. A class may be decomposed once, as a product of
child spaces (a reshape split it) or as a concatenation of parts (a chunk, a cat or a select along an
outer factor). Leaves of those decompositions are what users see as groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Iterable, Iterator, Union

import numpy as np

Factor = Union[int, "Space"]
Axis = tuple  # tuple[Factor, ...]; the empty tuple is a size-1 axis

@dataclass(eq=False)
class Space:
    """Ids come from the counter of the analysis that made the space (`ids`), so they are unique per analysis
    and no state is shared between compiles."""
    size: int
    ids: "count" = field(default_factory=count, repr=False)
    id: int = -1
    parent: "Space | None" = None
    split: tuple[str, list["Space"]] | None = None  # ("product" | "concat", children)
    frozen: str | None = None  # why this class may not be pruned
    fixed: str | None = None  # tied to a fixed dimension: not a channel space at all
    tags: set = field(default_factory=set)
    members: int = 1  # union-find class size

    def __post_init__(self) -> None:
        if self.id < 0:
            self.id = next(self.ids)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"S{self.id}[{self.size}]"


def find(s: Space) -> Space:
    root = s
    while root.parent is not None:
        root = root.parent
    while s.parent is not None:  # path compression
        s.parent, s = root, s.parent
    return root


def fsize(f: Factor) -> int:
    return f if isinstance(f, int) else f.size


def axis_size(axis: Axis) -> int:
    return int(np.prod([fsize(f) for f in axis], dtype=np.int64)) if axis else 1


def normalize(axis: Iterable[Factor]) -> Axis:
    """Expand product splits and drop size-1 factors, so two views of one layout compare factor by factor."""
    out: list[Factor] = []
    for f in axis:
        if isinstance(f, int):
            if f != 1:
                out.append(f)
            continue
        r = find(f)
        if r.split is not None and r.split[0] == "product":
            out.extend(normalize(r.split[1]))
        elif r.size != 1:
            out.append(r)
    merged: list[Factor] = []
    for f in out:  # adjacent fixed factors carry no identity: one fixed factor of their product
        if isinstance(f, int) and merged and isinstance(merged[-1], int):
            merged[-1] *= f
        else:
            merged.append(f)
    return tuple(merged)


def leaves(f: Factor) -> Iterator[Space]:
    """The undecomposed spaces a factor is made of."""
    if isinstance(f, int):
        return
    r = find(f)
    if r.split is None:
        yield r
    else:
        for c in r.split[1]:
            yield from leaves(c)


def spaces_of(axes: Iterable[Axis]) -> list[Space]:
    return [leaf for axis in axes for f in axis for leaf in leaves(f)]


def freeze(s: Space, reason: str, *, fixed: bool = False) -> None:
    """Keep a class whole; `fixed` marks a class tied to a fixed dimension (input, output, tokens)."""
    r = find(s)
    if fixed:
        if r.fixed is None:
            r.fixed = reason
    elif r.frozen is None and r.fixed is None:
        r.frozen = reason
    if r.split is not None:
        for c in r.split[1]:
            freeze(c, reason, fixed=fixed)


def union(a: Space, b: Space, why: str) -> Space:
    ra, rb = find(a), find(b)
    if ra is rb:
        return ra
    if ra.size != rb.size:
        freeze(ra, why)
        freeze(rb, why)
        return ra
    if rb.split is not None and ra.split is None:
        ra, rb = rb, ra
    rb.parent = ra
    ra.members += rb.members
    ra.tags |= rb.tags
    if rb.split is not None:
        ka, ca = ra.split
        kb, cb = rb.split
        if ka == kb and [c.size for c in ca] == [c.size for c in cb]:
            for x, y in zip(ca, cb):
                union(x, y, why)
        else:
            freeze(ra, f"{why}: incompatible decompositions")
    for attr in ("fixed", "frozen"):
        reason = getattr(ra, attr) or getattr(rb, attr)
        if reason:
            setattr(ra, attr, None)
            freeze(ra, reason, fixed=attr == "fixed")
    return ra


def decompose(s: Space, kind: str, sizes: list[int]) -> list[Space] | None:
    """Split a class into a product or concatenation of new spaces (or return the matching existing split)."""
    r = find(s)
    if r.split is not None:
        k, children = r.split
        if k == kind and [c.size for c in children] == list(sizes):
            return children
        if (kind, k) == ("product", "concat") and len(sizes) == 2 and sizes[0] == len(children) \
                and all(c.size == sizes[1] for c in children):
            # k stacked equal parts (a q/k/v bias concat) viewed as k x part: the parts share one layout
            stack = Space(sizes[0], r.ids)
            freeze(stack, "stacked parts", fixed=True)
            for c in children[1:]:
                union(children[0], c, "stacked parts")
            return [stack, children[0]]
        return None
    children = [Space(n, r.ids) for n in sizes]
    for c in children:
        c.tags |= {t for t in r.tags if t == "normalized"}
    r.split = (kind, children)
    if r.fixed:
        for c in children:
            freeze(c, r.fixed, fixed=True)
    elif r.frozen:
        for c in children:
            freeze(c, r.frozen)
    return children


# ----------------------------------------------------------------------------------------------------
# Selections: kept indices per leaf, mapped back to flat positions of any factor or axis.

def kept_positions(f: Factor, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Flat indices of a factor that survive, given kept indices per leaf root id (absent: all kept)."""
    if isinstance(f, int):
        return np.arange(f)
    r = find(f)
    if r.split is None:
        return keep.get(r.id, np.arange(r.size))
    kind, children = r.split
    parts = [kept_positions(c, keep) for c in children]
    if kind == "concat":
        offsets = np.cumsum([0] + [c.size for c in children[:-1]])
        return np.concatenate([p + o for p, o in zip(parts, offsets)]).astype(np.int64)
    flat = np.zeros(1, dtype=np.int64)
    for c, p in zip(children, parts):
        flat = (flat[:, None] * c.size + p[None, :]).reshape(-1)
    return flat


def axis_kept(axis: Axis, keep: dict[int, np.ndarray]) -> np.ndarray:
    flat = np.zeros(1, dtype=np.int64)
    for f in axis:
        flat = (flat[:, None] * fsize(f) + kept_positions(f, keep)[None, :]).reshape(-1)
    return flat


def index_map(f: Factor, leaf: Space) -> np.ndarray:
    """For each flat position of a factor, the index along `leaf` it lies on (-1 where it does not)."""
    if isinstance(f, int):
        return np.full(f, -1, dtype=np.int64)
    r = find(f)
    if r.split is None:
        return np.arange(r.size) if r is find(leaf) else np.full(r.size, -1, dtype=np.int64)
    kind, children = r.split
    maps = [index_map(c, leaf) for c in children]
    if kind == "concat":
        return np.concatenate(maps)
    out = np.full(1, -1, dtype=np.int64)
    for m in maps:
        out = np.maximum(out[:, None], m[None, :]).reshape(-1)
    return out
