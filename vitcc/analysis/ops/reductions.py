"""Reductions, softmax and pooling.

A sum or an Lp norm over a channel axis is exact under masking (removed channels are zeros and add
nothing). A mean, variance, max or min over channels takes, like a norm's statistics, only the kept
channels (masked semantics below): a hand-written norm then prunes as `layer_norm` does. Reductions whose
result names positions (argmax, max with indices) or weighs every channel (logsumexp, prod) freeze, and
softmax over a channel axis stays frozen: the removed channels would still take probability mass.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from vitcc.analysis.rulekit import dim, named_arg, spatial_through
from vitcc.ir.types import fixed_type, is_ttype, multi_output, shape_of
from vitcc.ir.spaces import spaces_of

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("reductions")

_ZERO_NEUTRAL = {aten.sum, aten.linalg_vector_norm, aten.norm}
_OVER_KEPT = {aten.mean, aten.var, aten.std, aten.amax, aten.amin}  # masked: over the kept channels only


@family.coupling(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm,
                 aten.norm, aten.max, aten.min, aten.logsumexp, aten.prod, aten.any, aten.all, aten.argmax)
def reduce(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    packet = node.target.overloadpacket
    dims = named_arg(node, "dim")
    if not is_ttype(x):
        return a.unknown(node)
    if dims is None or dims == []:
        if spaces_of(x):
            a.freeze_types([x], "reduction over all axes")
        return a.out_type()
    keep = bool(named_arg(node, "keepdim", False))
    dims = {dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims)}
    reduced = [x[d] for d in dims]
    if spaces_of(reduced) and packet not in _ZERO_NEUTRAL | _OVER_KEPT:
        a.freeze_types([tuple(reduced)], f"{packet.__name__} over a channel axis (removed zeros would change it)")
    out = tuple(() if (i in dims and keep) else ax for i, ax in enumerate(x) if keep or i not in dims)
    if packet in (aten.max, aten.min) and multi_output(node):
        return (out, out)  # values and indices
    return out


@family.masked(*_OVER_KEPT)
def masked_reduce(interp, node: fx.Node, args, kwargs) -> torch.Tensor | None:
    """The statistic of the kept channels: removed ones neither add to it nor count."""
    x = args[0]
    dims = named_arg(node, "dim")
    if not isinstance(x, torch.Tensor) or dims is None or dims == []:
        return None
    dims = tuple(sorted(dim(d, x.dim()) for d in ([dims] if isinstance(dims, int) else dims)))
    m = interp.mask(node.args[0].name, x, dims)
    if m is None:
        return None
    keep, packet, kept = bool(named_arg(node, "keepdim", False)), node.target.overloadpacket, m.expand(x.shape) != 0
    if packet in (aten.amax, aten.amin):
        fill = float("-inf") if packet is aten.amax else float("inf")
        return getattr(torch, packet.__name__)(torch.where(kept, x, fill), dims, keepdim=keep)
    count = kept.sum(dims, keepdim=True).to(x.dtype)
    mean = torch.where(kept, x, 0).sum(dims, keepdim=True) / count
    if packet is aten.mean:
        return mean if keep else mean.squeeze(dims)
    correction = named_arg(node, "correction")
    if correction is None:
        correction = 1 if named_arg(node, "unbiased", True) else 0
    var = torch.where(kept, (x - mean) ** 2, 0).sum(dims, keepdim=keep) / (count if keep else count.squeeze(dims)
                                                                            ).sub(correction).clamp_min(0)
    return var.sqrt() if packet is aten.std else var


@family.coupling(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(a, node: fx.Node) -> Any:
    x = a.type_of(node.args[0])
    d = dim(node.args[1], len(x))
    if spaces_of([x[d]]):
        a.freeze_types([(x[d],)], "softmax over a channel axis: removed channels would still take probability "
                                  "mass, so masking is not removal")
    return x


POOLS = [aten.avg_pool1d, aten.avg_pool2d, aten.max_pool1d, aten.max_pool2d, aten.adaptive_avg_pool1d,
         aten.adaptive_avg_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
         aten.max_pool2d_with_indices]
# resampling is per channel too (size arguments are spatial: nothing to rewrite)
RESAMPLES = [aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
             aten.upsample_linear1d, aten._upsample_nearest_exact2d, aten._upsample_bilinear2d_aa,
             aten._upsample_bicubic2d_aa]


@family.coupling(*POOLS, *RESAMPLES)
def pool(a, node: fx.Node) -> Any:
    """Pooling and resampling work per channel (N, C, *spatial): channels pass, spatial axes take the output's
    sizes."""
    x = a.type_of(node.args[0])
    multi = multi_output(node)  # max_pool2d_with_indices: (values, indices)
    out = tuple(node.meta["tensor_meta"][0].shape) if multi else shape_of(node)
    if not is_ttype(x) or out is None or len(out) != len(x) or len(x) < 3:
        return a.unknown(node)
    res = [x[0] if shape_of(node.args[0])[0] == out[0] else fixed_type((out[0],))[0], x[1], *fixed_type(out[2:])]
    spatial_through(a, node, x, res, pointwise=tuple(shape_of(node.args[0])[2:]) == tuple(out[2:])
                    and node.target.overloadpacket in RESAMPLES)  # a same-size resample is the identity
    res = tuple(res)
    return (res, res) if multi else res
