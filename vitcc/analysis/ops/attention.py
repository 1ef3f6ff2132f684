"""Fused attention (scaled_dot_product_attention).

q, k and v share their batch axes (heads) and q, k their contracted head dim; v's head dim only meets the
output projection. SDPA's default scale reads q's last size, so after head-dim pruning the compact graph
passes the original scale explicitly (masked semantics: attention keeps the original model's scale).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from vitcc.ir.types import is_ttype, shape_of
from vitcc.analysis.rulekit import named_arg, tag

from vitcc.analysis.ops.table import Family

aten = torch.ops.aten
family = Family("attention")
SDPA = aten.scaled_dot_product_attention


@family.coupling(SDPA)
def sdpa(a, node: fx.Node) -> Any:
    q, k, v = (a.type_of(named_arg(node, n)) for n in ("query", "key", "value"))
    a.tie(q[-1], k[-1], "attention q.k")
    a.tie(k[-2], v[-2], "attention keys/values")
    batch = a.broadcast([tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2])])
    mask = a.type_of(named_arg(node, "attn_mask"))
    if is_ttype(mask):
        a.broadcast([tuple(batch) + (q[-2], k[-2]), mask])
    tag(q[-1], "head_dim_qk")
    tag(v[-1], "head_dim_v")
    for ax in batch:
        tag(ax, "heads")
    return tuple(batch) + (q[-2], v[-1])


@family.rewrite(SDPA)
def compact_sdpa(node: fx.Node, ctx) -> None:
    q, k, v = (named_arg(node, n) for n in ("query", "key", "value"))
    if any(ctx.is_channel(ax) and ctx.size(ax) == 0 for ax in ctx.types[node.name][:-2]):
        _no_heads(node, q, k, v)
        return
    full = shape_of(q)[-1]
    if named_arg(node, "scale") is None and ctx.size(ctx.types[q.name][-1]) != full:
        node.kwargs = {**node.kwargs, "scale": full ** -0.5}


def _no_heads(node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node) -> None:
    """Attention with every head removed outputs an empty tensor: two matmuls give it its shape, where torch
    2.11's CPU SDPA kernel divides by the head count (SIGFPE). fold then replaces the output projection with
    its bias, and dce removes both."""
    graph = node.graph
    with graph.inserting_before(node):
        scores = graph.call_function(aten.matmul.default, (q, graph.call_function(aten.transpose.int, (k, -2, -1))))
    node.target, node.args, node.kwargs = aten.matmul.default, (scores, v), {}


@family.macs(SDPA)
def sdpa_macs(node: fx.Node, shapes) -> int:
    q, k, v = (shapes.node(named_arg(node, n)) for n in ("query", "key", "value"))
    batch = math.prod(shapes.node(node)[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])
