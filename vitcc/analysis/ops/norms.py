"""Normalisations. The normalized axis of a layer norm is the residual stream's mark ("normalized").

Masked semantics: a norm whose normalized axes lost channels takes its statistics over the kept channels
only (divisor: the kept count). Zeroing channels under a full-width norm is not removing them; this rule
is what makes residual pruning exact.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from vitcc.ir.types import multi_output, shape_of
from vitcc.analysis.rulekit import named_arg, regroup, tag
from vitcc.ir.spaces import freeze, normalize

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("norms")
NORMS = [aten.layer_norm, aten.rms_norm]


@family.coupling(*NORMS)
def layer_norm(a, node: fx.Node) -> Any:
    x = list(a.type_of(node.args[0]))
    k = len(node.args[1])
    params = [a.type_of(named_arg(node, n)) for n in ("weight", "bias")]
    for i in range(len(x) - k, len(x)):
        for p in params:
            if p is not None:
                x[i] = a.tie(x[i], p[i - len(x)], "norm affine")
        tag(x[i], "normalized")
    return tuple(x)


@family.rewrite(*NORMS)
def rewrite_normalized_shape(node: fx.Node, ctx) -> None:
    x = ctx.types[node.args[0].name]
    k = len(node.args[1])
    node.args = (node.args[0], [ctx.size(ax) for ax in x[-k:]]) + tuple(node.args[2:])


@family.masked(*NORMS)
def masked_norm(interp, node: fx.Node, args, kwargs) -> torch.Tensor | None:
    """Statistics over the kept channels of the normalized axes."""
    x, k = args[0], len(args[1])
    m = interp.mask(node.name, x, range(x.dim() - k, x.dim()))
    if m is None:
        return None
    rms = node.target.overloadpacket is aten.rms_norm
    names = ("input", "normalized_shape", "weight", "eps") if rms else \
        ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args)) | kwargs
    w, b, eps = bound.get("weight"), bound.get("bias"), bound.get("eps")
    dims = tuple(range(x.dim() - k, x.dim()))
    count = m.expand(x.shape).sum(dims, keepdim=True)
    y = x * m  # the one full-size temporary: the rest is in place on it (a norm's input is a residual stream)
    if not rms:
        y.sub_(y.sum(dims, keepdim=True).div_(count)).mul_(m)
    var = torch.linalg.vector_norm(y, 2, dims, keepdim=True).square_().div_(count)
    default_eps = torch.finfo(x.dtype).eps if rms else 1e-5
    y.mul_(var.add_(default_eps if eps is None else eps).rsqrt_())
    if w is not None:  # in place unless the affine parameters promote the dtype
        y = y.mul_(w) if torch.result_type(y, w) == y.dtype else y * w
    if b is not None:
        y = y.add_(b) if torch.result_type(y, b) == y.dtype else y + b
    return y


@family.coupling(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.instance_norm)
def batch_norm(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    for n in ("weight", "bias", "running_mean", "running_var"):
        p = a.type_of(named_arg(node, n))
        if p is not None:
            a.tie(x[1], p[0], "batchnorm channels")
    if multi_output(node):
        return (x,) + tuple(a.out_type()[1:])
    return x


@family.coupling(aten.group_norm)
def group_norm(a, node: fx.Node) -> Any:
    """G groups of C/G channels: the groups stay, the channels within them are pruned alike in every group.
    One channel per group (G = C) is a per-channel norm: removing channels removes their groups."""
    x = a.type_of(node.args[0])
    groups, c = named_arg(node, "num_groups"), shape_of(node.args[0])[1]
    split = regroup(a, normalize(x[1]), (groups, c // groups)) if 1 < groups < c else None
    if split is None and 1 < groups < c:
        a.freeze_types([(x[1],)], "group_norm groups that do not align with the channel layout")
    for f in split[0] if split is not None else ():
        if not isinstance(f, int):
            freeze(f, f"the groups of {a.why()}", fixed=True)
    for n in ("weight", "bias"):
        p = a.type_of(named_arg(node, n))
        if p is not None:
            a.tie(x[1], p[0], "group norm affine")
    return x


@family.rewrite(aten.group_norm)
def rewrite_num_groups(node: fx.Node, ctx) -> None:
    x = ctx.types[node.args[0].name]
    if named_arg(node, "num_groups") == shape_of(node.args[0])[1]:
        node.args = (node.args[0], ctx.size(x[1])) + tuple(node.args[2:])


@family.masked(aten.group_norm)
def masked_group_norm(interp, node: fx.Node, args, kwargs) -> torch.Tensor | None:
    """Each group's statistics over its kept channels."""
    x = args[0]
    names = ("input", "num_groups", "weight", "bias", "eps")
    bound = dict(zip(names, args)) | kwargs
    m = interp.mask(node.name, x, range(1, 2))
    if m is None or bound["num_groups"] == x.shape[1]:
        return None
    g, w, b, eps = bound["num_groups"], bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
    xs = (x * m).reshape(x.shape[0], g, -1)
    ms = m.expand(1, x.shape[1], *x.shape[2:]).reshape(1, g, -1)
    count = ms.sum(-1, keepdim=True)
    mean = xs.sum(-1, keepdim=True) / count
    xc = (xs - mean) * ms
    var = (xc * xc).sum(-1, keepdim=True) / count
    y = (xc * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y
