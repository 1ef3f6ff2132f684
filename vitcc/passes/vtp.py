"""vtp: vision transformer pruning by learned dimension gates (Zhu, Tang, Han, "Vision Transformer
Pruning", 2021, arXiv 2104.08500). Needs training data.

What the paper **states**:
- a gate vector multiplies each prunable dimension; training adds `lambda * sum |gate|` (lambda = 1e-4) to
  the task loss; dimensions whose gate falls below a threshold set by the target rate are removed; then
  the pruned model is fine-tuned without the penalty;
- the residual stream itself is not pruned; gates sit on the attention dimensions, the attention output
  (proj input) and the MLP hidden dimensions (and, in the paper, on the qkv and fc1 inputs).

What vitcc **reconstructs / departs from**:
- gates are inserted into the captured aten graph as `x * pad(gate, 1)[index]` (aten.constant_pad_nd,
  index_select, mul; the gate a parameter `vtp_gate_<k>` of the GraphModule) right after the aten.linear
  that produces the gated dimension (qkv rows for head dims, fc1 rows for MLP neurons; a linear whose
  weight is a parameter read by that linear only), one gate per index of a head-dim
  group (q/k dims; v dims = the proj input) or MLP hidden group. A head dim's gate is shared by all heads
  of the block (vitcc keeps the same head-dim indices in every head), so pruning stays balanced per head;
  the unofficial code prunes head dims unevenly and scrambles heads: not copied. A q/k dim's gate scales
  both q and k (its effect on the logits is gate^2);
- the qkv and fc1 *inputs* are the residual stream in vitcc's coupled groups (pruning them per layer
  would need per-consumer copies of the stream), so they are not gated: departure from the paper;
- training: `vitcc.training.finetune.finetune` (AdamW, cosine, no distillation) for `epochs` (pass option, else
  `options["sparsity_epochs"]`, else 1 epoch), the L1 term `lam` (default 1e-4) added to every step;
- scores are |gate|; one global threshold over all gates (select's family "vtp"), so pruning lands where
  gates are small, typically the MLP (the paper's observation). `scores=norm` (ablation) ranks the same
  dimensions of the same trained model by group norm, uniformly per group, instead;
- removing the gates folds them into the producing linear (rows and bias scaled by the gate) and
  erases their nodes, parameters and buffers: the graph is the ungated one node for node (so the analysis
  stays valid), computing exactly what the gated model computed (to float rounding); the masked
  reference (`program.original`) becomes that trained, folded model.
Other groups (residual, heads when asked with --prune) get magnitude fallback scores. Default kinds:
head_dim, mlp. Order: after lowrank (whose re-analysis would invalidate scores of earlier passes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from vitcc.analysis.rulekit import named_arg
from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass
from vitcc.pipeline.pass_base import Option

from vitcc.ir.types import attr_at
from vitcc.passes._common import (claim, default_kinds, epochs_of, fill_fallback, index_map_of, linear_nodes, rebase, sparsity_train, train_loader)
from vitcc.passes._common import SPARSITY_TRAINING_OPTIONS
from vitcc.search.scores import group_norms

GATED_KINDS = ("head_dim", "mlp")
aten = torch.ops.aten


@dataclass
class PlacedGate:
    """One gate application: `mul = linear * pad(gate, 1)[index]`, all of it vtp's own graph nodes."""
    gate: str  # the gate parameter's attribute on the GraphModule (shared by a group's producers)
    index: str  # buffer: for each output row of the linear, its gate index (gate size = not gated)
    weight: str  # the producing linear's weight (its rows and bias get the gate on folding)
    bias: str | None
    linear: fx.Node
    nodes: list[fx.Node]  # the gate's nodes, last one the mul


def _producers(by_weight: dict[str, fx.Node], group) -> list[tuple[str, fx.Node]]:
    """(weight name, aten.linear node) of every linear whose output rows lie on the group."""
    return [(m.param, by_weight[m.param]) for m in group.members if m.axis == 0 and m.param in by_weight]


def _gate_nodes(gm: fx.GraphModule, node: fx.Node, gate: str, index: str) -> list[fx.Node]:
    """`node * constant_pad_nd(gate, [0, 1], 1.0)[index]` as aten nodes right after `node`."""
    g = gm.graph
    with g.inserting_after(node):
        gate_n = g.get_attr(gate)
    with g.inserting_after(gate_n):
        index_n = g.get_attr(index)
    with g.inserting_after(index_n):
        padded = g.call_function(aten.constant_pad_nd.default, (gate_n, [0, 1], 1.0))
    with g.inserting_after(padded):
        scale = g.call_function(aten.index_select.default, (padded, 0, index_n))
    with g.inserting_after(scale):
        mul = g.call_function(aten.mul.Tensor, (node, scale))
    return [gate_n, index_n, padded, scale, mul]


def insert_gates(program: Program, groups) -> dict[str, list[PlacedGate]]:
    """Insert gate nodes for `groups` after their producing linears; returns group name -> its gates.

    Each group gets one gate parameter `vtp_gate_<k>` (ones: the identity) on the GraphModule, shared by
    all its producers (q and k rows of every head for a q/k dim) through per-linear index buffers.
    """
    gm = program.gm
    placed: dict[str, list[PlacedGate]] = {}
    by_weight = linear_nodes(gm)
    for g in groups:
        prods = _producers(by_weight, g)
        if not prods:
            continue
        k = len(placed)
        gate = f"vtp_gate_{k}"
        like = attr_at(gm, prods[0][0])
        gm.register_parameter(gate, nn.Parameter(torch.ones(g.size, dtype=like.dtype, device=like.device)))
        for j, (weight, node) in enumerate(prods):
            index = index_map_of(program, g, weight, 0)
            name = f"vtp_gate_{k}_index_{j}"
            index = torch.where(index < 0, g.size, index).long().to(like.device)
            gm.register_buffer(name, index, persistent=False)
            nodes = _gate_nodes(gm, node, gate, name)
            node.replace_all_uses_with(nodes[-1], delete_user_cb=lambda u, mul=nodes[-1]: u is not mul)
            bias = named_arg(node, "bias")
            placed.setdefault(g.name, []).append(
                PlacedGate(gate, name, weight, bias.target if bias is not None else None, node, nodes))
    gm.graph.lint()
    gm.recompile()
    return placed


def fold_gates(program: Program, placed: dict[str, list[PlacedGate]]) -> None:
    """Scale each producing linear's rows and bias by its gate, then remove every gate node and tensor."""
    gm = program.gm
    with torch.no_grad():
        for entries in placed.values():
            for p in entries:
                s = _scale(gm, p)
                w = attr_at(gm, p.weight)
                w.mul_(s[:, None].to(w.dtype))
                if p.bias is not None:
                    b = attr_at(gm, p.bias)
                    b.mul_(s.to(b.dtype))
                p.nodes[-1].replace_all_uses_with(p.nodes[-1].args[0])  # the linear, or another gate on it
                for n in reversed(p.nodes):
                    gm.graph.erase_node(n)
                delattr(gm, p.index)
        for gate in {p.gate for entries in placed.values() for p in entries}:
            delattr(gm, gate)
    gm.graph.lint()
    gm.recompile()  # the graph is the ungated one again: its shapes and analysis still hold


def _scale(gm: fx.GraphModule, p: PlacedGate) -> torch.Tensor:
    """The factor the gate nodes multiply by, as the graph computes it."""
    padded = aten.constant_pad_nd.default(attr_at(gm, p.gate).detach(), [0, 1], 1.0)
    return aten.index_select.default(padded, 0, attr_at(gm, p.index))


def gate_params(program: Program, placed: dict[str, list[PlacedGate]]) -> dict[str, nn.Parameter]:
    return {gname: attr_at(program.gm, entries[0].gate) for gname, entries in placed.items()}


@register_pass("vtp")
class Vtp(Pass):
    """Learned dimension gates with an L1 penalty; one global gate threshold (Zhu, Tang, Han 2021)."""
    options_spec = (Option("lam", float, 1e-4, "L1 weight of the gates"),
                    Option("scores", str, "gate", "rank by |gate| or (ablation) by group norm",
                           choices=("gate", "norm")),
                    *SPARSITY_TRAINING_OPTIONS)

    def run(self, program: Program) -> PassResult:
        default_kinds(program, GATED_KINDS)
        lam = float(self.options.get("lam", 1e-4))
        if str(self.options.get("scores", "gate")) not in ("gate", "norm"):
            raise VitccError(f"vtp{{scores={self.options['scores']}}}: expected gate or norm")
        epochs = epochs_of(program, self.options, default=1)
        if epochs < 1:
            raise VitccError("vtp needs at least one epoch of gate sparsity training: vtp{epochs=N} or "
                             "--sparsity-epochs N")
        rank_groups = set((program.options.get("lowrank") or {}).get("rank_groups", ()))
        groups = [g for g in program.groups if g.prunable and g.kind in GATED_KINDS and g.name not in rank_groups]
        train_loader(program, "vtp", "its gate sparsity training")  # data first: fail before touching the graph
        placed = insert_gates(program, groups)
        gates = gate_params(program, placed)
        params = list(gates.values())

        def l1(_model):
            return lam * sum((p.abs().sum() for p in params), torch.zeros(()))
        history = sparsity_train(program, "vtp", self.options, epochs=epochs, extra_loss=l1, label="vtp gates")
        values = {name: p.detach().abs().clone() for name, p in gates.items()}
        fold_gates(program, placed)
        rebase(program)
        by = str(self.options.get("scores", "gate"))
        if by == "norm":  # ablation: the same trained model, the same dims, ranked by weight norm per group
            cache: dict = {}
            for name in values:
                claim(program, "vtp", name, group_norms(program, program.group(name), 2.0, cache).sqrt())
        else:
            for name, v in values.items():
                claim(program, "vtp", name, v, family="vtp")
        fill_fallback(program, "vtp")
        kinds = {g.name: g.kind for g in program.groups}
        per_kind: dict[str, list] = {}
        for n, v in values.items():
            per_kind.setdefault(kinds[n], []).append(v)
        program.report["vtp"] = {"epochs": epochs, "lam": lam, "gated_groups": len(values),
                                 "mean_gate": {k: float(torch.cat(v).mean()) for k, v in per_kind.items()},
                                 "loss": history.get("loss"), "l1": history.get("extra")}
        return PassResult(info={"gated_groups": len(values), "epochs": epochs})
