"""rewrite: physically remove unselected channels from parameters, shapes and module attributes.

Parameters are sliced along every axis laid on a pruned space and stay trainable nn.Parameters.
Size arguments of reshapes, views and expands, normalized shapes and the attention scale are rewritten
so the graph needs no vitcc code at inference.
"""
from __future__ import annotations


import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitcc.coupling import is_ttype, shape_of
from vitcc.ir import Program, axis_count
from vitcc.spaces import axis_kept, normalize
from vitcc.pipeline import Pass, PassResult, register_pass

_SIZE_METHODS = {"view", "reshape", "expand"}


@register_pass("rewrite", kind="structural")
class Rewrite(Pass):
    def run(self, program: Program) -> PassResult:
        gm, c = program.gm, program.coupling
        keep = program.keep_by_root()
        changed = _slice_parameters(gm, c.params, keep)
        size = lambda ax: axis_count(ax, keep, c.aliases)
        for node in gm.graph.nodes:
            t = c.types.get(node.name)
            if node.op == "call_module":
                _update_module(gm.get_submodule(node.target), node, c, size)
            elif node.target in _SIZE_METHODS or node.target is torch.reshape:
                _rewrite_sizes(node, t, size, program.is_channel_axis)
            elif node.target is F.layer_norm or node.target is getattr(F, "rms_norm", None):
                x = c.types[node.args[0].name]
                k = len(node.args[1])
                node.args = (node.args[0], tuple(size(ax) for ax in x[-k:])) + tuple(node.args[2:])
            elif node.target is F.scaled_dot_product_attention:
                q = node.args[0] if node.args else node.kwargs["query"]
                if "scale" not in node.kwargs and size(c.types[q.name][-1]) != shape_of(q)[-1]:
                    node.kwargs = {**node.kwargs, "scale": shape_of(q)[-1] ** -0.5}
            elif node.target in ("split", torch.split) and isinstance(node.args[1], (list, tuple)) and isinstance(t, tuple):
                dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
                node.args = (node.args[0], [size(o[dim]) for o in t]) + tuple(node.args[2:])
        gm.recompile()
        return PassResult(info={"sliced": changed})


def _slice_parameters(gm: fx.GraphModule, params: dict, keep: dict) -> int:
    changed = 0
    for name, t in params.items():
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        old = getattr(mod, attr)
        new = old.detach()
        for axis, ax in enumerate(t):
            idx = axis_kept(normalize(ax), keep)
            if len(idx) != new.shape[axis]:
                new = new.index_select(axis, torch.as_tensor(idx, dtype=torch.long))
        if new.shape == old.shape:
            continue
        changed += 1
        if isinstance(old, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new.clone(), requires_grad=old.requires_grad))
        else:
            mod._buffers[attr] = new.clone()
    return changed


def _rewrite_sizes(node: fx.Node, t, size, is_channel) -> None:
    if not is_ttype(t):
        return
    sizes = node.args[1:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
    if packed:
        sizes = sizes[0]
    if len(sizes) != len(t):
        return
    # a channel axis always gets its compact size as a constant: a size read from another tensor's shape
    # (timm's `B, N, C = x.shape` ... `.reshape(B, N, C)`) may belong to a differently pruned space
    new = [size(ax) if is_channel(ax) else s for ax, s in zip(t, sizes)]
    node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)


def _update_module(mod: nn.Module, node: fx.Node, c, size) -> None:
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        x = c.types[node.args[0].name]
        mod.normalized_shape = tuple(size(ax) for ax in x[-len(mod.normalized_shape):])
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.out_channels if depthwise else mod.weight.shape[1] * mod.groups
        if depthwise:
            mod.groups = mod.out_channels
    elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        mod.num_features = mod.weight.shape[0] if mod.weight is not None else mod.running_mean.shape[0]
