"""rewrite: physically remove unselected channels from parameters and from the ops' size arguments.

Parameters are sliced along every axis laid on a pruned space and stay trainable nn.Parameters. Size
arguments (reshapes, normalized shapes, split sizes, depthwise groups, the attention scale) are rewritten
by the op table's `rewrite` entries, so the graph needs no vitcc code at inference. An entry that raises
keeps the groups its node touches whole (named in the report) and the rewrite runs again.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Container

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from vitcc.coupling import flatten_types, target_name
from vitcc.ir import Program, axis_count
from vitcc.pipeline import Pass, PassResult, register_pass
from vitcc.spaces import axis_kept, find, normalize, spaces_of


@register_pass("rewrite", kind="structural")
class Rewrite(Pass):
    needs = frozenset({"shapes", "coupling"})

    def run(self, program: Program) -> PassResult:
        gm, c = program.gm, program.coupling
        failed = _rewrite_sizes(program)
        if failed:  # never crash on what could be partly pruned: keep those nodes' groups whole, then again
            _keep_whole(program, failed)
            if _rewrite_sizes(program, skip=failed):  # their sizes are the captured ones now
                raise RuntimeError(f"rewrite failed at {', '.join(failed)} even with their groups kept whole")
        changed = _slice_parameters(gm, c.params, program.keep_by_root())
        gm.graph.lint()
        gm.recompile()
        return PassResult(info={"sliced": changed, "kept_whole_at": sorted(failed)},
                          preserved=frozenset())  # the graph is the compact one now


def _rewrite_sizes(program: Program, skip: Container[str] = ()) -> dict[str, str]:
    """Each node's op-table `rewrite` entry; if any raises, every node is restored and the failures returned."""
    c, keep = program.coupling, program.keep_by_root()
    ctx = SimpleNamespace(types=c.types, size=lambda ax: axis_count(ax, keep, c.aliases),
                          is_channel=program.is_channel_axis)
    saved, failed = [], {}
    for node in list(program.gm.graph.nodes):
        info = program.ops.get(node.target) if node.op == "call_function" else None
        if info is None or info.rewrite is None or node.name in skip:
            continue
        saved.append((node, node.target, node.args, node.kwargs))
        try:
            info.rewrite(node, ctx)
        except Exception as e:  # noqa: BLE001 - reported and recovered from in _keep_whole
            failed[node.name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    if failed:
        for node, target, args, kwargs in saved:
            node.target, node.args, node.kwargs = target, args, kwargs
    return failed


def _keep_whole(program: Program, failed: dict[str, str]) -> None:
    """The groups a failed node touches (and those sharing a fused reshape with them) keep every channel."""
    nodes = {n.name: n for n in program.gm.graph.nodes}
    by_root = {find(g.space).id: g for g in program.groups}
    whole = set()
    for name, why in failed.items():
        node = nodes[name]
        roots = {leaf.id for t in flatten_types([program.coupling.types.get(n.name) for n in (node, *node.all_input_nodes)])
                 for leaf in spaces_of(t)}
        touched = [by_root[r].name for r in roots if r in by_root]
        whole |= set(touched)
        program.report.setdefault("frozen", []).append(
            {"node": name, "op": target_name(node), "reason": f"rewrite failed ({why}): kept {', '.join(touched)} whole"})
    grown = True
    while grown:
        grown = False
        for spaces in program.coupling.equal_counts:
            tied = {by_root[find(s).id].name for s in spaces if find(s).id in by_root}
            if tied & whole and not tied <= whole:
                whole |= tied
                grown = True
    for name in whole:
        program.keep[name] = np.arange(program.group(name).size)


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
        elif attr in mod._buffers:
            mod._buffers[attr] = new.clone()
        else:
            setattr(mod, attr, new.clone())  # a lifted tensor constant
    return changed
