"""Linear algebra: linear, convolution, matmul and einsum.

A Linear's input's last axis is tied to its weight's columns and its output's last axis is the weight's
rows; a Linear that reads another's output with nothing between (a factorised matrix, lowrank's `down` and
`up`) tags the width between them a rank. An activation x activation product is attention: its contracted
axis is a head dim and its batch axes carry heads. MACs are counted at the compact shapes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.rulekit import is_param_node, named_arg, regroup, spatial_through, tag
from vitcc.ir.types import is_ttype, shape_of
from vitcc.ir.spaces import axis_size, freeze, normalize

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("linalg")


@family.coupling(aten.linear)
def linear(a, node: fx.Node) -> Any:
    x, w, b = (a.type_of(named_arg(node, n)) for n in ("input", "weight", "bias"))
    a.tie(x[-1], w[1], "linear input")
    if b is not None:
        a.tie(b[0], w[0], "linear bias")
    if _from_linear(named_arg(node, "input")):
        tag(w[1], "rank")  # no nonlinearity between two linears: their shared width is the rank of the product
    return tuple(x[:-1]) + (w[0],)


_IDENTITIES = {aten.dropout.default, aten.alias.default, aten.clone.default}  # in eval: the value unchanged


def _from_linear(x: Any) -> bool:
    """Is `x` a linear's output, directly or through ops that pass it unchanged?"""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _IDENTITIES:
        x = x.args[0]
    return isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.linear.default


@family.macs(aten.linear)
def linear_macs(node: fx.Node, shapes) -> int:
    return math.prod(shapes.node(node)) * shapes.node(node.args[1])[1]


@family.masked(aten.linear)
def kept_linear(interp, node: fx.Node, args, kwargs) -> torch.Tensor | None:
    """The kept rows from the kept columns only: the input is zero at its removed columns and the removed
    rows are zeroed after, so the kept block gives the full product's values. GEMMs are most of the
    reference's time, and this cuts them to the compact model's size (the weight is still the original's)."""
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    rows = interp.kept_last(node, (*x.shape[:-1], w.shape[0]), w.device)
    cols = interp.kept_last(node.args[0], x.shape, x.device) if interp.zero_where_removed(node.args[0]) else None
    if rows is None and cols is None:
        return None
    # sliced on every run, not kept: kept blocks are a quarter of the weights in fresh memory, whose first-touch
    # page faults cost more than slicing again (ViT-B: 46K faults against 37K, no faster)
    block = w if rows is None else w.index_select(0, rows)
    block = block if cols is None else block.index_select(1, cols)
    kept_bias = bias if bias is None or rows is None else bias.index_select(0, rows)
    y = torch.nn.functional.linear(x if cols is None else x.index_select(-1, cols), block, kept_bias)
    return y if rows is None else y.new_zeros((*y.shape[:-1], w.shape[0])).index_copy_(-1, rows, y)


CONVS = [aten.conv1d, aten.conv2d, aten.conv3d]


@family.coupling(*CONVS)
def conv(a, node: fx.Node) -> Any:
    x, w, b = (a.type_of(named_arg(node, n)) for n in ("input", "weight", "bias"))
    groups = named_arg(node, "groups", 1)
    out = list(a.out_type())
    out[0] = x[0]  # per sample: the batch axis (which may carry heads or windows) passes
    spatial_through(a, node, x, out, pointwise=all(k == 1 for k in shape_of(node.args[1])[2:])
                    and set(named_arg(node, "stride", [1])) == {1} and set(named_arg(node, "padding", [0])) == {0})
    cin, cout = shape_of(node.args[0])[1], shape_of(node.args[1])[0]
    if groups == 1:
        a.tie(x[1], w[1], "conv input channels")
        out[1] = w[0]
    elif groups == cin == cout:
        out[1] = a.tie(x[1], w[0], "depthwise conv channels")
    else:  # G groups: (G, C/G) on both sides; the per-group channels are pruned alike in every group
        xin = regroup(a, normalize(x[1]), (groups, cin // groups))
        wout = regroup(a, normalize(w[0]), (groups, cout // groups))
        if xin is None or wout is None:
            a.freeze_types([x, w], "grouped convolution over a channel layout it does not align with")
            return tuple(out)
        for f in xin[0] + wout[0]:
            if not isinstance(f, int):
                freeze(f, f"the groups of {a.why()}", fixed=True)
        a.tie(xin[1], w[1], "grouped conv input channels")
        out[1] = w[0]
    if b is not None:
        a.tie(b[0], w[0], "conv bias")
    return tuple(out)


CONV_TRANSPOSES = [aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d]


@family.coupling(*CONV_TRANSPOSES)
def conv_transpose(a, node: fx.Node) -> Any:
    """Transposed conv: weight (C_in, C_out/groups, *k). Ungrouped, C_in and C_out are channels; grouped freezes."""
    x, w, b = (a.type_of(named_arg(node, n)) for n in ("input", "weight", "bias"))
    out = list(a.out_type())
    out[0] = x[0]
    spatial_through(a, node, x, out, pointwise=False)
    if named_arg(node, "groups", 1) != 1:
        a.freeze_types([x, w], "grouped transposed convolution")
        return tuple(out)
    a.tie(x[1], w[0], "transposed conv input channels")
    out[1] = w[1]
    if b is not None:
        a.tie(b[0], w[1], "transposed conv bias")
    return tuple(out)


@family.macs(*CONV_TRANSPOSES)
def conv_transpose_macs(node: fx.Node, shapes) -> int:
    return math.prod(shapes.node(node.args[0])) * math.prod(shapes.node(node.args[1])[1:])


@family.rewrite(*CONVS)
def rewrite_groups(node: fx.Node, ctx) -> None:
    """A depthwise convolution keeps one group per kept channel."""
    groups = named_arg(node, "groups", 1)
    w = ctx.types[node.args[1].name]
    if groups == 1 or groups != axis_size(normalize(w[0])):  # a grouped (not depthwise) conv is frozen: as is
        return
    kept = ctx.size(w[0])
    args = list(node.args) + [None] * (7 - len(node.args))
    defaults = [None, None, None, [1], [0], [1], 1]
    args = [d if v is None and i >= 3 else v for i, (v, d) in enumerate(zip(args, defaults))]
    args[6] = kept
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("stride", "padding", "dilation", "groups")}


@family.macs(*CONVS)
def conv_macs(node: fx.Node, shapes) -> int:
    return math.prod(shapes.node(node)) * math.prod(shapes.node(node.args[1])[1:])


MATMULS = [aten.matmul, aten.bmm, aten.mm]


@family.coupling(*MATMULS)
def matmul(a, node: fx.Node) -> Any:
    x, y = a.type_of(node.args[0]), a.type_of(node.args[1])
    if not (is_ttype(x) and is_ttype(y)) or len(x) < 2 or len(y) < 2:
        return a.unknown(node)
    a.tie(x[-1], y[-2], "matmul contraction")
    both_activations = not any(is_param_node(n) for n in node.args[:2])
    if both_activations:  # attention: contracted channels are head dims, batch axes carry heads
        tag(x[-1], "head_dim_qk")
        tag(y[-1], "head_dim_v")
    batch = a.broadcast([tuple(x[:-2]), tuple(y[:-2])]) if len(x) > 2 or len(y) > 2 else ()
    if both_activations:
        for ax in batch:
            tag(ax, "heads")
    return tuple(batch) + (x[-2], y[-1])


@family.macs(*MATMULS)
def matmul_macs(node: fx.Node, shapes) -> int:
    return math.prod(shapes.node(node)) * shapes.node(node.args[0])[-1]


def _einsum_parts(node: fx.Node):
    eq = node.args[0].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if "." in eq or not rhs and "->" not in eq:
        return None
    return ins, rhs


@family.coupling(aten.einsum)
def einsum(a, node: fx.Node) -> Any:
    """The subscripts say it: a letter shared by operands is tied, a letter missing from the output is
    contracted. Between two activations a contracted letter is a head dim and a kept shared one carries
    heads, as for matmul. Ellipses and repeated letters within an operand freeze."""
    parts = _einsum_parts(node)
    ts = [a.type_of(x) for x in node.args[1]]
    if parts is None or not all(is_ttype(t_) for t_ in ts) or len(parts[0]) != len(ts) \
            or any(len(s) != len(t_) or len(set(s)) != len(s) for s, t_ in zip(parts[0], ts)):
        return a.unknown(node, "einsum with an ellipsis, a repeated index or unknown operands")
    ins, rhs = parts
    letters: dict[str, Any] = {}
    for subs, t_ in zip(ins, ts):
        for ch, ax in zip(subs, t_):
            letters[ch] = a.tie(letters[ch], ax, f"einsum index {ch}") if ch in letters else ax
    if len(ins) == 2 and not any(is_param_node(n) for n in node.args[1]):
        shared = set(ins[0]) & set(ins[1])
        contracted = shared - set(rhs)
        for ch in shared & set(rhs):
            tag(letters[ch], "heads")
        for ch in contracted:
            tag(letters[ch], "head_dim_qk")
        for ch in set(ins[1]) - set(ins[0]) if contracted else ():
            tag(letters[ch], "head_dim_v")
    return tuple(letters[ch] for ch in rhs)


@family.macs(aten.einsum)
def einsum_macs(node: fx.Node, shapes) -> int:
    parts = _einsum_parts(node)
    if parts is None:
        return 0
    sizes: dict[str, int] = {}
    for subs, x in zip(parts[0], node.args[1]):
        s = shapes.node(x)
        if s is None or len(s) != len(subs):
            return 0
        sizes.update(zip(subs, s))
    return math.prod(sizes.values()) if len(parts[0]) > 1 else 0
