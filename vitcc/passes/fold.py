"""fold: a branch left with no channels becomes the constant it computes.

A linear whose input width was pruned to zero outputs its bias (an attention block with no heads left
is its projection bias; an MLP with no neurons is fc2's bias). Ops on constants only are then evaluated
once and stored, so dce can drop the whole branch. Each fold is checked by running the graph.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from vitcc.devices import exact_float32
from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass

from vitcc.ir.program import is_impure
from vitcc.ir.types import attr_at

aten = torch.ops.aten


@register_pass("fold", kind="structural")
class Fold(Pass):
    writes_weights = False  # adds new constants, never writes a tensor in place (Pass.writes_weights)
    def run(self, program: Program) -> PassResult:
        gm = program.gm
        empty = [n for n in gm.graph.nodes if n.target is aten.linear.default
                 and n.args[1].op == "get_attr" and attr_at(gm, n.args[1].target).shape[1] == 0]
        if not empty:
            return PassResult(modified=False)
        backup = copy.deepcopy(gm)
        with torch.no_grad(), exact_float32():  # TF32 would round the two runs differently
            ref = gm(*program.example_inputs)
        for i, node in enumerate(empty):
            weight = attr_at(gm, node.args[1].target)
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias = attr_at(gm, b.target) if b is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            _replace_with_constant(gm, node, bias.detach(), f"_vitcc_folded_{i}")
        _fold_constants(gm)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.recompile()
        with torch.no_grad(), exact_float32():
            out = gm(*program.example_inputs)
        if not _same(out, ref):
            program.gm = backup  # the constant did not broadcast like the branch did: keep the branch
            return PassResult(modified=False, info={"reverted": True})
        return PassResult(info={"folded": len(empty)})


def _same(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.allclose(x, y, rtol=1e-5, atol=1e-5) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def _replace_with_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, name: str) -> None:
    gm.register_buffer(name, value.clone())
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(name)
    node.replace_all_uses_with(const)
    gm.graph.erase_node(node)


def _fold_constants(gm: fx.GraphModule) -> None:
    """Evaluate call nodes whose tensor inputs are all stored constants."""
    k = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            ins = node.all_input_nodes
            if node.op != "call_function" or not ins or not all(i.op == "get_attr" for i in ins):
                continue
            interp = fx.Interpreter(gm)
            for i in ins:
                interp.env[i] = interp.fetch_attr(i.target)
            with torch.no_grad():
                value = interp.run_node(node)
            if not isinstance(value, torch.Tensor):
                continue
            k += 1
            _replace_with_constant(gm, node, value, f"_vitcc_const_{k}")
            changed = True
