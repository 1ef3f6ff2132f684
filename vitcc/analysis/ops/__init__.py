"""The op table: everything vitcc knows about an aten op, in one entry.

An entry (:class:`OpInfo`) holds, for one aten overload:

- ``coupling(analyzer, node) -> type``: how the op's axes couple (see :mod:`vitcc.analysis.coupling`);
- ``macs(node, shapes) -> int``: analytic multiply-accumulates at the compact shapes;
- ``rewrite(node, ctx)``: how rewrite updates the op's size arguments;
- ``masked(interpreter, node, args, kwargs) -> Tensor | None``: masked semantics that differ from running the
  op on zeroed inputs (norm statistics over kept channels), or the same values for less work (a linear's
  kept block).

Entries are grouped by family in this package (linalg, elementwise, norms, layout, attention, reductions,
indexing). The built-in table is assembled once and never mutated: a compile works on its own copy, to which
users add rules (``table.rule(torch.ops.aten.X.default)``). An op without an entry freezes what it touches.
"""
from __future__ import annotations

from typing import Any

from vitcc.analysis.ops import attention, elementwise, indexing, layout, linalg, norms, reductions
from vitcc.analysis.ops.table import Family, OpInfo, OpTable

__all__ = ["OpInfo", "OpTable", "Family", "default_table"]

# assembled once from the family modules at import; never mutated (a compile works on its own copy)
_BUILTIN: dict[Any, OpInfo] = {k: v for mod in (elementwise, layout, indexing, reductions, norms, linalg, attention)
                               for k, v in mod.family.entries.items()}


def default_table() -> OpTable:
    """A fresh copy of the built-in table."""
    return OpTable(_BUILTIN)
