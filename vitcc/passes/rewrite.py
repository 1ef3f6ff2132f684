"""rewrite: physically remove unselected channels from parameters and from the ops' size arguments.

Parameters are sliced along every axis laid on a pruned space and stay trainable nn.Parameters. Size
arguments (reshapes, normalized shapes, split sizes, depthwise groups, the attention scale) are rewritten
by the op table's `rewrite` entries, so the graph needs no vitcc code at inference. An entry that raises
keeps the groups its node touches whole (named in the report) and the rewrite runs again. A removed
residual branch goes first: its add becomes the identity on the stream (its users read the skip) and every
node only the branch needed is erased, in-place ops included (dce then drops its parameters); the stream's
reshapes that then meet (a Swin block's) merge.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Container

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from vitcc.analysis.rulekit import flatten_types
from vitcc.ir.types import target_name
from vitcc.ir.program import Program
from vitcc.ir.shapes import axis_count
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass
from vitcc.ir.spaces import axis_kept, find, normalize, spaces_of

aten = torch.ops.aten


@register_pass("rewrite", kind="structural")
class Rewrite(Pass):
    writes_weights = False  # slices into new tensors, never writes one in place (Pass.writes_weights)
    needs = frozenset({"shapes", "coupling"})

    def run(self, program: Program) -> PassResult:
        gm, c = program.gm, program.coupling
        skips = _remove_branches(gm, [program.branch(name) for name in program.keep.removed])
        failed = _rewrite_sizes(program)
        if failed:  # never crash on what could be partly pruned: keep those nodes' groups whole, then again
            _keep_whole(program, failed)
            if _rewrite_sizes(program, skip=failed):  # their sizes are the captured ones now
                raise RuntimeError(f"rewrite failed at {', '.join(failed)} even with their groups kept whole")
        _merge_reshapes(gm, skips)
        keep = program.keep_by_root()
        gone = program.removed_params(keep)
        changed = _slice_parameters(gm, {p: t for p, t in c.params.items() if p not in gone}, keep)
        gm.graph.lint()
        gm.recompile()
        return PassResult(info={"sliced": changed, "kept_whole_at": sorted(failed),
                                "branches_removed": len(program.keep.removed)},
                          preserved=frozenset())  # the graph is the compact one now


def _remove_branches(gm: fx.GraphModule, branches: list) -> list[fx.Node]:
    """Each removed branch's add becomes its skip (in graph order: the skip may be an add removed before it);
    returns the skips, where the stream now runs past removed branches."""
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    became: dict[str, fx.Node] = {}
    for b in sorted(branches, key=lambda b: order[b.add]):
        skip = became.get(b.skip, nodes[b.skip])
        nodes[b.add].replace_all_uses_with(skip)
        became[b.add] = skip
        gm.graph.erase_node(nodes[b.add])
        for name in reversed(b.nodes):  # users before what they read
            gm.graph.erase_node(nodes[name])
    return list(dict.fromkeys(became.values()))


def _merge_reshapes(gm: fx.GraphModule, skips: list[fx.Node]) -> None:
    """A block's reshapes of the stream meet once its branches are gone (Swin: (B, H, W, C) -> (B, HW, C) for
    the MLP, and back): a reshape of a reshape reads the first one's input, and two reshapes of one input to
    the same sizes are one. The reshapes left dead go with dce."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    todo = [u for s in skips for u in s.users]
    while todo:
        u = todo.pop()
        if u.target is not aten.reshape.default or getattr(u, "_erased", False):
            continue
        start = u.args[0]
        while isinstance(u.args[0], fx.Node) and u.args[0].target is aten.reshape.default:
            u.args = (u.args[0].args[0], *u.args[1:])
        if u.args[0] is start:
            continue
        same = next((w for w in u.args[0].users if w is not u and w.target is aten.reshape.default
                     and list(w.args[1]) == list(u.args[1])), None)
        if same is None:
            todo += list(u.users)
            continue
        first, later = sorted((same, u), key=order.__getitem__)
        later.replace_all_uses_with(first)
        gm.graph.erase_node(later)
        todo += list(first.users)


def _rewrite_sizes(program: Program, skip: Container[str] = ()) -> dict[str, str]:
    """Each node's op-table `rewrite` entry; if any raises, every node is restored and the failures returned."""
    c, keep = program.coupling, program.keep_by_root()
    roots = program.group_roots()
    ctx = SimpleNamespace(types=c.types, size=lambda ax: axis_count(ax, keep, c.aliases),
                          is_channel=lambda ax: program.is_channel_axis(ax, roots))
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
                new = new.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=new.device))
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
