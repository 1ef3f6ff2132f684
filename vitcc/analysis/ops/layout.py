"""Layout ops: reshapes split and merge factors, permutes move them, cat/stack/split/unbind join and cut.

Rewrite updates size arguments: a channel axis gets its compact size, a symbolic (batch-dependent) size
is scaled by kept/full so the compact program keeps a dynamic batch.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.rulekit import arg, dim, regroup
from vitcc.ir.types import is_ttype, shape_of
from vitcc.ir.spaces import axis_size, decompose, freeze, fsize, normalize, spaces_of

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("layout")

RESHAPES = [aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
            aten.unsqueeze, aten.view_as, aten.reshape_as, aten.alias]


@family.coupling(*RESHAPES)
def reshape(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    out_shape = shape_of(node)
    if not is_ttype(x) or out_shape is None:
        return a.unknown(node)
    axes = regroup(a, [f for ax in x for f in normalize(ax)], out_shape)
    if axes is None:
        a.freeze_types([x], "reshape does not align with channel layout")
        return a.out_type()
    return axes


def compact_sizes(node: fx.Node, t, sizes, ctx) -> list:
    """Size arguments for the compact graph: channel axes get their kept size. A size computed in the graph
    (a symbolic batch times heads) becomes `size * kept // full`, so batch stays dynamic."""
    out = []
    for ax, s in zip(t, sizes):
        if not ctx.is_channel(ax) or (isinstance(s, int) and s == -1):
            out.append(s)
            continue
        kept, full = ctx.size(ax), axis_size(normalize(ax))
        if isinstance(s, fx.Node):
            if kept == full:
                out.append(s)
                continue
            with node.graph.inserting_before(node):
                scaled = node.graph.call_function(operator.mul, (s, kept))
                out.append(node.graph.call_function(operator.floordiv, (scaled, full)))
        else:
            out.append(s * kept // full if full and s % full == 0 and s != full else kept)
    return out


@family.rewrite(aten.view, aten.reshape, aten._unsafe_view, aten.expand)
def rewrite_shape_arg(node: fx.Node, ctx) -> None:
    t = ctx.types.get(node.name)
    if not is_ttype(t) or not isinstance(node.args[1], (list, tuple)) or len(node.args[1]) != len(t):
        return
    node.args = (node.args[0], compact_sizes(node, t, node.args[1], ctx)) + tuple(node.args[2:])


@family.rewrite(aten.unflatten)
def rewrite_unflatten(node: fx.Node, ctx) -> None:
    t = ctx.types.get(node.name)
    x, d, sizes = node.args[:3]
    if not is_ttype(t):
        return
    d = dim(d, len(t) - len(sizes) + 1)
    new = compact_sizes(node, t[d:d + len(sizes)], sizes, ctx)
    node.args = (x, d, new) + tuple(node.args[3:])


@family.coupling(aten.permute)
def permute(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    return tuple(x[dim(d, len(x))] for d in node.args[1])


@family.coupling(aten.transpose, aten.swapaxes)
def transpose(a, node: fx.Node) -> Any:
    x = list(a.type_of(node.args[0]))
    i, j = (dim(d, len(x)) for d in node.args[1:3])
    x[i], x[j] = x[j], x[i]
    return tuple(x)


@family.coupling(aten.t, aten.numpy_T)
def t(a, node: fx.Node) -> Any:
    return tuple(reversed(a.type_of(node.args[0])))


@family.coupling(aten.movedim)
def movedim(a, node: fx.Node) -> Any:
    x = list(a.type_of(node.args[0]))
    src, dst = node.args[1], node.args[2]
    src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
    order = [i for i in range(len(x)) if i not in {dim(s, len(x)) for s in src}]
    for s, d in sorted(zip((dim(s, len(x)) for s in src), (dim(d, len(x)) for d in dst)), key=lambda p: p[1]):
        order.insert(d, s)
    return tuple(x[i] for i in order)


@family.coupling(aten.expand, aten.expand_as, aten.repeat, aten.tile)
def expand(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    shape = shape_of(node)
    pad = ((),) * (len(shape) - len(x)) + tuple(x)
    out = []
    for ax, n in zip(pad, shape):
        size = axis_size(ax)
        if size == n:
            out.append(ax)
        elif size == 1:  # a broadcast axis ties nothing: a fresh space that takes whatever it meets
            out.append((a.space(n),))
        else:
            out.append((n // size,) + tuple(ax))
    return tuple(out)


@family.coupling(aten.pad, aten.constant_pad_nd, aten.reflection_pad2d, aten.replication_pad2d)
def pad(a, node: fx.Node) -> Any:
    """Padding grows some axes (spatial ones in Swin); an axis whose size is unchanged passes through."""
    x = a.type_of(node.args[0])
    out = []
    for ax, n_in, n_out in zip(x, shape_of(node.args[0]), shape_of(node)):
        if n_in == n_out:
            out.append(ax)
        else:
            if spaces_of([ax]):
                a.freeze_types([(ax,)], "padding of a channel axis")
            out.append((n_out,))
    return tuple(out)


@family.coupling(aten.roll)
def roll(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    dims = arg(node, 2, "dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims or range(len(x)))
    a.freeze_types([tuple(x[dim(d, len(x))] for d in dims)], "roll along a channel axis")
    return x


@family.coupling(aten.cat, aten.concat, aten.concatenate)
def cat(a, node: fx.Node) -> Any:
    ts = [t for t in a.type_of(node.args[0]) if is_ttype(t) and not (len(t) == 1 and axis_size(t[0]) == 0)]
    ranks = {len(t) for t in ts}
    d = dim(arg(node, 1, "dim", 0), max(ranks))
    out = []
    for i in range(max(ranks)):
        if i == d:
            continue
        ax = ts[0][i]
        for t_ in ts[1:]:
            ax = a.tie(ax, t_[i], "cat")
        out.append(ax)
    along = [t_[d] for t_ in ts]
    n = sum(axis_size(x) for x in along)
    if not spaces_of(along) or any(axis_size(x) > 1 and not spaces_of([x]) for x in along):
        for sp in spaces_of(along):  # joined with fixed data (patch tokens): a token axis, not channels
            freeze(sp, a.why("concatenated with a fixed axis"), fixed=True)
        cat_axis = (n,)
    elif all(ax == along[0] for ax in along):  # k copies of one layout: a fixed k times that layout
        cat_axis = (len(along),) + tuple(along[0])
    else:
        s = a.space(n)
        parts = decompose(s, "concat", [axis_size(x) for x in along])
        for p, ax in zip(parts, along):
            a.tie((p,), ax, "cat along channels")
        cat_axis = (s,)
    out.insert(d, cat_axis)
    return tuple(out)


@family.coupling(aten.stack)
def stack(a, node: fx.Node) -> Any:
    """Stacking k tensors: their axes tie, and a new fixed axis of size k enumerates them."""
    ts = a.type_of(node.args[0])
    if not all(is_ttype(t_) for t_ in ts) or len({len(t_) for t_ in ts}) != 1:
        return a.unknown(node)
    out = list(ts[0])
    for t_ in ts[1:]:
        out = [a.tie(x, y, "stack") for x, y in zip(out, t_)]
    d = dim(arg(node, 1, "dim", 0), len(out) + 1)
    out.insert(d, (len(ts),))
    return tuple(out)


@family.coupling(aten.unbind)
def unbind(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = dim(arg(node, 1, "dim", 0), len(x))
    return tuple(a.select(node.args[0], x, d, j) for j in range(axis_size(x[d])))


@family.coupling(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def split(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    metas = node.meta.get("tensor_meta")
    d = dim(arg(node, 2, "dim", 0), len(x))
    sizes = [m.shape[d] for m in metas]
    if len(sizes) == 1:
        return (x,)
    ax = normalize(x[d])
    if not spaces_of([ax]):
        return tuple(tuple(x[:d]) + ((n,),) + tuple(x[d + 1:]) for n in sizes)
    if len(ax) > 1 and fsize(ax[0]) == len(sizes) and len(set(sizes)) == 1:
        # chunks along the outer factor of a product: each chunk is the inner layout
        return tuple(a.select(node.args[0], x, d, j, keep_axis=True) for j in range(len(sizes)))
    if len(ax) == 1:
        parts = decompose(ax[0], "concat", sizes)
        if parts is not None:
            return tuple(tuple(x[:d]) + ((p,),) + tuple(x[d + 1:]) for p in parts)
    a.freeze_types([x], "split along a channel axis that is not a whole factor")
    return tuple(tuple(x[:d]) + ((n,),) + tuple(x[d + 1:]) for n in sizes)


@family.rewrite(aten.split, aten.split_with_sizes, aten.chunk)
def rewrite_split(node: fx.Node, ctx) -> None:
    """Parts of a channel concat may keep different counts: always split with explicit sizes."""
    t = ctx.types.get(node.name)
    if not isinstance(t, tuple) or not all(is_ttype(p) for p in t) or len(t) < 2:
        return
    d = dim(arg(node, 2, "dim", 0), len(t[0]))
    if not ctx.is_channel(t[0][d]):
        return
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], [ctx.size(p[d]) for p in t], d)
    node.kwargs = {}
