"""Groups as data: one prunable leaf space with the parameter axes (members) laid on it, named and of a kind.
The analysis builds them (vitcc.analysis.groups); selections, the search, rewrite and the report read them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vitcc.ir.spaces import Space

KINDS = ("residual", "heads", "head_dim", "mlp", "rank", "other")  # group kinds, in report order


@dataclass
class Member:
    param: str
    axis: int


@dataclass
class Group:
    name: str
    kind: str
    size: int
    members: list[Member]
    frozen: str | None = None
    space: Space | None = field(default=None, repr=False, compare=False)

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size > 1

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("space")
        return d
