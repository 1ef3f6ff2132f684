"""The op table's types: an entry per op (`OpInfo`), a family's entries, and a compile's table."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

__all__ = ["OpInfo", "OpTable", "Family"]


@dataclass(frozen=True)
class OpInfo:
    family: str
    coupling: Callable | None = None
    macs: Callable | None = None
    rewrite: Callable | None = None
    masked: Callable | None = None


class Family:
    """The entries of one op family, filled by decorators when its module is imported."""

    def __init__(self, name: str):
        self.name = name
        self.entries: dict[Any, OpInfo] = {}

    def _set(self, field_name: str, targets: Iterable[Any]) -> Callable:
        def deco(fn: Callable) -> Callable:
            for t in targets:
                info = self.entries.get(t, OpInfo(self.name))
                self.entries[t] = replace(info, **{field_name: fn})
            return fn
        return deco

    def coupling(self, *targets: Any) -> Callable:
        return self._set("coupling", targets)

    def macs(self, *targets: Any) -> Callable:
        return self._set("macs", targets)

    def rewrite(self, *targets: Any) -> Callable:
        return self._set("rewrite", targets)

    def masked(self, *targets: Any) -> Callable:
        return self._set("masked", targets)


class OpTable:
    """A compile's view of the op table: the built-ins plus the user's additions, keyed by aten overload."""

    def __init__(self, entries: dict[Any, OpInfo] | None = None):
        self.entries: dict[Any, OpInfo] = dict(entries or {})

    def copy(self) -> "OpTable":
        return OpTable(self.entries)

    def get(self, target: Any) -> OpInfo | None:
        info = self.entries.get(target)
        if info is None and hasattr(target, "overloadpacket"):  # a rule for the packet covers every overload
            info = self.entries.get(target.overloadpacket)
        return info

    def rule(self, *targets: Any) -> Callable:
        """Decorator: a coupling rule ``fn(analyzer, node) -> type`` for aten overloads (or whole packets)."""
        def deco(fn: Callable) -> Callable:
            for t in targets:
                self.entries[t] = replace(self.entries.get(t, OpInfo("user")), coupling=fn)
            return fn
        return deco

    def families(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t, info in self.entries.items():
            out.setdefault(info.family, []).append(str(t))
        return out
