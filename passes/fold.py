"""fold: a branch left with no channels becomes the constant it computes.

A Linear whose input width was pruned to zero outputs its bias (an attention block with no heads left
is its projection bias; an MLP with no neurons is fc2's bias). Ops on constants only are then evaluated
once and stored, so dce can drop the whole branch. Each fold is checked by running the graph.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass

_PASSTHROUGH = (nn.Identity, nn.Dropout)


@register_pass("fold", kind="structural")
class Fold(Pass):
    def run(self, program: Program) -> PassResult:
        gm = program.gm
        empty = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), nn.Linear)
                 and gm.get_submodule(n.target).in_features == 0]
        if not empty:
            return PassResult(modified=False)
        backup = copy.deepcopy(gm)
        with torch.no_grad():
            ref = gm(*program.example_inputs)
        for i, node in enumerate(empty):
            mod = gm.get_submodule(node.target)
            bias = mod.bias if mod.bias is not None else torch.zeros(mod.out_features)
            _replace_with_constant(gm, node, bias.detach(), f"_vitcc_folded_{i}")
        _fold_constants(gm)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        with torch.no_grad():
            out = gm(*program.example_inputs)
        if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
            program.gm = backup  # the constant did not broadcast like the branch did: keep the branch
            return PassResult(modified=False, info={"reverted": True})
        return PassResult(info={"folded": len(empty)})


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
            if node.op not in ("call_function", "call_method", "call_module") or not ins:
                continue
            if not all(i.op == "get_attr" for i in ins):
                continue
            if node.op == "call_module" and not isinstance(gm.get_submodule(node.target), _PASSTHROUGH):
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
