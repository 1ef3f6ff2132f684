"""The op table: everything vitcc knows about an aten op, in one entry.

An entry (:class:`OpInfo`) holds, for one aten overload:

- ``coupling(analyzer, node) -> type``: how the op's axes couple (see :mod:`vitcc.coupling`);
- ``macs(node, shapes) -> int``: analytic multiply-accumulates at the compact shapes;
- ``rewrite(node, ctx)``: how rewrite updates the op's size arguments;
- ``masked(interpreter, node, args, kwargs) -> Tensor | None``: masked semantics that differ from running the
  op on zeroed inputs (norm statistics over kept channels), or the same values for less work (a linear's
  kept block);
- ``latency(node, shapes) -> TimedOp | None``: what the latency model times.

Entries are grouped by family in this package (linalg, elementwise, norms, layout, attention, reductions,
indexing). The built-in table is assembled once and never mutated: a compile works on its own copy, to which
users add rules (``table.rule(torch.ops.aten.X.default)``). An op without an entry freezes what it touches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

__all__ = ["OpInfo", "OpTable", "Family", "default_table"]


@dataclass(frozen=True)
class OpInfo:
    family: str
    coupling: Callable | None = None
    macs: Callable | None = None
    rewrite: Callable | None = None
    masked: Callable | None = None
    latency: Callable | None = None


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

    def latency(self, *targets: Any) -> Callable:
        return self._set("latency", targets)


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


_BUILTIN: dict[Any, OpInfo] | None = None


def default_table() -> OpTable:
    """A fresh copy of the built-in table."""
    global _BUILTIN
    if _BUILTIN is None:  # assembled once from the family modules; read-only afterwards
        from . import attention, elementwise, indexing, layout, linalg, norms, reductions
        merged: dict[Any, OpInfo] = {}
        for mod in (elementwise, layout, indexing, reductions, norms, linalg, attention):
            merged.update(mod.family.entries)
        _BUILTIN = merged
    return OpTable(_BUILTIN)
