"""Dependency analysis: the op table's coupling rules turn a captured aten graph into coupled channel spaces.

Every tensor value gets a *type*: a tuple of axes, each a tuple of factors (see :mod:`vitcc.ir.spaces`).
Parameters introduce spaces; rules tie, split and move them. Ops without a rule freeze every space they
touch and are reported, so an unknown op can make vitcc prune less, never prune wrongly.
"""
from __future__ import annotations

import operator
from itertools import count
from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.ops import OpTable, default_table
from vitcc.analysis.rulekit import flatten_types, out_fixed, prod
from vitcc.ir.spaces import Axis, Space, axis_size, decompose, find, freeze, fsize, normalize, spaces_of, union
from vitcc.ir.types import Coupling, Frozen, TType, aten, attr_at, fixed_type, is_ttype, shape_of, target_name

# Python-level nodes torch.export leaves in the graph: tuple access and arithmetic on symbolic sizes.
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                    operator.ge, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not}
_VERSIONED = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")  # not in every torch
_IGNORED = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.dim.default, torch._check,
            *(getattr(getattr(aten, op, None), "default", None) for op in _VERSIONED),
            getattr(torch, "_check_is_size", None)} - {None}


class Analyzer:
    """Walks the graph once, applying the op table's coupling rule of each node."""

    def __init__(self, gm: fx.GraphModule, table: OpTable | None = None):
        self.gm = gm
        self.table = table if table is not None else default_table()
        self.ids = count()  # space ids belong to this analysis
        self.types: dict[fx.Node, Any] = {}
        self.params: dict[str, TType] = {}
        self.frozen: list[Frozen] = []
        self.node: fx.Node | None = None
        self.aliases: dict[Space, list[Space]] = {}  # a space split per index by a select -> its copies
        self.equal_counts: list[list[Space]] = []  # spaces whose kept counts must match
        self.selects: dict[int, Any] = {}
        self._constant: dict[fx.Node, bool] = {}

    # -- helpers used by rules ------------------------------------------------------------------
    def space(self, n: int) -> Space:
        return Space(n, self.ids)

    def param(self, qualname: str) -> TType:
        if qualname not in self.params:
            t = attr_at(self.gm, qualname)
            # buffers too (a constant k bias carries channels); index buffers become fixed where they index
            self.params[qualname] = tuple((self.space(n),) if n != 1 else () for n in t.shape)
        return self.params[qualname]

    def type_of(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.types.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.type_of(x) for x in a)
        return None

    def constant(self, a: Any) -> bool:
        """Whether a value is computed from parameters and buffers alone, not from the model's inputs."""
        return not isinstance(a, fx.Node) or self._constant.get(a, False)

    def why(self, what: str = "") -> str:
        n = self.node
        return f"{n.name} ({target_name(n)}){': ' + what if what else ''}"

    def freeze_types(self, t: Any, reason: str) -> None:
        if is_ttype(t):
            spaces = spaces_of(t)
            if any(find(s).frozen is None and find(s).fixed is None for s in spaces):
                self.frozen.append(Frozen(self.node.name, reason, target_name(self.node), spaces))
            for s in spaces:
                freeze(s, reason)
        elif isinstance(t, (list, tuple)):
            for x in t:
                self.freeze_types(x, reason)

    def tie(self, a: Axis, b: Axis, what: str = "tied") -> Axis:
        """Make two axes the same layout: spaces unify, a space meeting a fixed size is not a channel."""
        why = self.why(what)
        na, nb = list(normalize(a)), list(normalize(b))
        out: list = []
        while na and nb:
            x, y = na.pop(0), nb.pop(0)
            sx, sy = fsize(x), fsize(y)
            if sx != sy:  # split the larger factor to match the run of smaller ones
                big, small, rest = (x, [y], nb) if sx > sy else (y, [x], na)
                while rest and prod(small) < fsize(big):
                    small.append(rest.pop(0))
                if prod(small) != fsize(big):
                    self._fix_all([big, *small, *na, *nb], why)
                    return a
                pieces = [fsize(f) for f in small]
                parts = pieces if isinstance(big, int) else decompose(big, "product", pieces)
                if parts is None:
                    self._fix_all([big, *small], why)
                    out.extend(small)
                    continue
                for p, q in zip(parts, small):
                    self._tie_factor(p, q, why)
                out.extend(small)
                continue
            self._tie_factor(x, y, why)
            out.append(x)
        return tuple(out)

    def _tie_factor(self, x, y, why: str) -> None:
        if isinstance(x, int) and isinstance(y, int):
            return
        if isinstance(x, int) or isinstance(y, int):
            freeze(y if isinstance(x, int) else x, f"tied to a fixed dimension at {why}", fixed=True)
            return
        union(x, y, why)

    def _fix_all(self, factors, why: str) -> None:
        for f in factors:
            if not isinstance(f, int):
                freeze(f, f"non-aligned layouts at {why}")
        self.frozen.append(Frozen(self.node.name, f"non-aligned layouts: {why}", target_name(self.node),
                                  [f for f in factors if not isinstance(f, int)]))

    def out_type(self) -> Any:
        return out_fixed(self.node)

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> Coupling:
        for node in self.gm.graph.nodes:
            self.node = node
            self._constant[node] = node.op == "get_attr" or (
                node.op == "call_function" and all(self._constant.get(x, False) for x in node.all_input_nodes))
            self.types[node] = self.apply(node)
        names = {n.name: t for n, t in self.types.items()}
        return Coupling(self.gm, names, self.params, self.frozen, self.aliases, leaf_equal_counts(self.equal_counts))

    def apply(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = shape_of(node)
            return fixed_type(shape) if shape is not None else None
        if node.op == "get_attr":
            obj = attr_at(self.gm, node.target)
            return self.param(node.target) if isinstance(obj, torch.Tensor) else None
        if node.op == "output":
            for t in flatten_types(self.type_of(node.args[0])):
                for ax in t:
                    for s in spaces_of([ax]):
                        freeze(s, "model output", fixed=True)
            return None
        if node.target in _IGNORED or node.target in _SIZE_ARITHMETIC:
            return None
        if node.target is operator.getitem:
            return self.getitem(node)
        info = self.table.get(node.target)
        if info is None or info.coupling is None:
            return self.unknown(node)
        try:
            return info.coupling(self, node)
        except Exception as e:  # noqa: BLE001 - a failing rule freezes what it touches, the rest still prunes
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            return self.unknown(node, f"rule for {target_name(node)} failed: {type(e).__name__}: {msg}")

    def getitem(self, node: fx.Node) -> Any:
        """Element of a multi-output op (unbind, split, max.dim, ...)."""
        x, idx = self.type_of(node.args[0]), node.args[1]
        if x is None or is_ttype(x):
            return self.out_type() if x is not None else None
        return x[idx] if isinstance(idx, int) and idx < len(x) else self.out_type()

    def unknown(self, node: fx.Node, why: str | None = None) -> Any:
        ins = [self.type_of(a) for a in node.all_input_nodes]
        if not any(is_ttype(t) or isinstance(t, (list, tuple)) for t in ins) and shape_of(node) is None:
            return None
        self.freeze_types(ins, why or f"no coupling rule for {target_name(node)}")
        return self.out_type()

    # -- shared rule helpers ----------------------------------------------------------------------
    def broadcast(self, ts: list) -> Any:
        """Elementwise broadcasting: same-size axes are tied, size-1 axes tie nothing."""
        ts = [t for t in ts if is_ttype(t)]
        if not ts:
            return self.out_type() if shape_of(self.node) else None
        rank = max(len(t) for t in ts)
        padded = [((),) * (rank - len(t)) + tuple(t) for t in ts]
        out = []
        for i in range(rank):
            axes = [p[i] for p in padded if axis_size(p[i]) != 1]
            ax = axes[0] if axes else ()
            for other in axes[1:]:
                ax = self.tie(ax, other, "broadcast")
            out.append(ax)
        return tuple(out)

    def select(self, src: fx.Node, x: TType, d: int, j: int, keep_axis: bool = False) -> TType:
        """Take index j of the outermost factor of axis d.

        When that factor is the outer child of a product split (the `3` of fused qkv), the inner children
        become per-index spaces (q, k and v each get their own heads and head dims) while nothing else
        shares them yet: the parent turns into a concatenation of independent parts.
        """
        ax = normalize(x[d])
        rest = tuple(x[:d]), tuple(x[d + 1:])
        if not ax:
            return rest[0] + ((),) * keep_axis + rest[1]
        outer, inner = ax[0], ax[1:]
        if isinstance(outer, int) or find(outer).fixed:
            return rest[0] + ((tuple(inner),) if keep_axis else ()) + rest[1]
        sub = self._per_index_spaces(src, outer)
        if sub is None:
            self.freeze_types(((outer,),), self.why("select along a shared channel factor"))
            mapping = {}
        else:
            mapping = sub[j]
        conv = lambda axis: tuple(mapping.get(find(f).id, f) if not isinstance(f, int) else f
                                  for f in normalize(axis))
        mid = (conv(inner),) if keep_axis else ()
        return tuple(conv(a) for a in rest[0]) + mid + tuple(conv(a) for a in rest[1])

    def _per_index_spaces(self, src: fx.Node, outer: Space):
        key = find(outer).id
        if key in self.selects:
            return self.selects[key]
        parent = self._parent_of(outer, near=src)
        result = None
        if parent is not None:
            kind, children = find(parent).split
            inner = list(normalize(tuple(children[1:])))
            ok = (kind == "product" and find(children[0]) is find(outer) and _only_selects(src)
                  and all(find(c).members == 1 for c in children)
                  and all(not isinstance(c, int) and c.members == 1 and not c.frozen and not c.fixed
                          for c in inner))
            if ok:
                per_index, parts = [], []
                for _ in range(outer.size):
                    fresh = {find(c).id: self.space(c.size) for c in inner}
                    for c in inner:
                        fresh[find(c).id].tags |= find(c).tags
                    per_index.append(fresh)
                    part = self.space(prod(inner))
                    decompose(part, "product", [c.size for c in inner])
                    for c, p in zip(inner, find(part).split[1]):
                        union(p, fresh[find(c).id], "select")
                    parts.append(part)
                find(parent).split = ("concat", parts)
                for c in inner:  # the fused tensor before the select keeps one size per inner factor
                    copies = [fresh[find(c).id] for fresh in per_index]
                    self.aliases[find(c)] = copies
                    self.equal_counts.append(copies)
                result = per_index
        self.selects[key] = result
        return result

    def _parent_of(self, s: Space, near: fx.Node | None = None) -> Space | None:
        """The product `s` is a factor of. Looked for first in the types of the few nodes `near` is computed
        from (the reshape that made the product is there), so a select costs the same in every block of a
        deep model; then in every parameter's type."""
        target = find(s)
        todo, seen = [near] if near is not None else [], set()
        while todo and len(seen) < 16:
            n = todo.pop(0)
            if n.name in seen:
                continue
            seen.add(n.name)
            t = self.types.get(n)
            for ax in t if is_ttype(t) else ():
                for f in ax:
                    hit = _search_parent(f, target)
                    if hit is not None:
                        return hit
            todo += n.all_input_nodes
        for t in self.params.values():
            for ax in t:
                for f in ax:
                    hit = _search_parent(f, target)
                    if hit is not None:
                        return hit
        return None


def leaf_equal_counts(sets: list[list[Space]]) -> list[list[Space]]:
    """Copies that a later reshape split into products (MHA's packed in_proj: q, k and v each become heads x
    head dim) keep equal counts when their factors at each position do: the constraint moves to the leaves,
    where groups are (q/k's head dim and v's head dim then keep equally many; the shared heads tie nothing)."""
    out = []
    for spaces in sets:
        roots = [find(s) for s in spaces]
        splits = [r.split for r in roots]
        if all(sp is not None and sp[0] == "product" for sp in splits) \
                and len({tuple(c.size for c in sp[1]) for sp in splits}) == 1:
            for i in range(len(splits[0][1])):
                out += leaf_equal_counts([[sp[1][i] for sp in splits]])
        elif len({r.id for r in roots}) > 1:
            out.append(spaces)
    return out


def _only_selects(src: fx.Node) -> bool:
    """Every use of the stacked tensor takes one slice of it (unbind, or select(x, 0, i) per part)."""
    return len(src.users) == 1 or all(u.target is aten.select.int for u in src.users)


def _search_parent(f, target: Space):
    if isinstance(f, int):
        return None
    r = find(f)
    if r.split is None:
        return None
    for c in r.split[1]:
        if find(c) is target:
            return r
        hit = _search_parent(c, target)
        if hit is not None:
            return hit
    return None


def analyze(gm: fx.GraphModule, table: OpTable | None = None) -> Coupling:
    """Derive coupled channel spaces from a captured graph whose nodes carry tensor_meta."""
    return Analyzer(gm, table).run()
