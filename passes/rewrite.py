"""rewrite: physically remove unselected channels from parameters and from the ops' size arguments.

Parameters are sliced along every axis laid on a pruned space and stay trainable nn.Parameters. Size
arguments (reshapes, normalized shapes, split sizes, depthwise groups, the attention scale) are rewritten
by the op table's `rewrite` entries, so the graph needs no vitcc code at inference.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.fx as fx
from torch import nn

from vitcc.ir import Program, axis_count
from vitcc.pipeline import Pass, PassResult, register_pass
from vitcc.spaces import axis_kept, normalize


@register_pass("rewrite", kind="structural")
class Rewrite(Pass):
    writes_weights = False  # slices into new tensors, never writes one in place (Pass.writes_weights)
    needs = frozenset({"shapes", "coupling"})

    def run(self, program: Program) -> PassResult:
        gm, c = program.gm, program.coupling
        keep = program.keep_by_root()
        changed = _slice_parameters(gm, c.params, keep)
        roots = program.group_roots()
        ctx = SimpleNamespace(types=c.types, size=lambda ax: axis_count(ax, keep, c.aliases),
                              is_channel=lambda ax: program.is_channel_axis(ax, roots))
        for node in list(gm.graph.nodes):
            info = program.ops.get(node.target) if node.op == "call_function" else None
            if info is not None and info.rewrite is not None:
                info.rewrite(node, ctx)
        gm.graph.lint()
        gm.recompile()
        return PassResult(info={"sliced": changed}, preserved=frozenset())  # the graph is the compact one now


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
        changed += 1  # `new` came out of index_select: a tensor of its own, never a view of `old`
        if isinstance(old, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        elif attr in mod._buffers:
            mod._buffers[attr] = new
        else:
            setattr(mod, attr, new)  # a lifted tensor constant
    return changed
