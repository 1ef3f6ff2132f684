"""vtp: vision transformer pruning by learned dimension gates (Zhu, Tang, Han, "Vision Transformer
Pruning", 2021, arXiv 2104.08500). Needs training data.

What the paper **states**:
- a gate vector multiplies each prunable dimension; training adds `lambda * sum |gate|` (lambda = 1e-4) to
  the task loss; dimensions whose gate falls below a threshold set by the target rate are removed; then
  the pruned model is fine-tuned without the penalty;
- the residual stream itself is not pruned; gates sit on the attention dimensions, the attention output
  (proj input) and the MLP hidden dimensions (and, in the paper, on the qkv and fc1 inputs).

What vitcc **reconstructs / departs from**:
- gates are inserted into the traced graph as `x * gate[index]` right after the Linear that produces the
  gated dimension (qkv rows for head dims, fc1 rows for MLP neurons), one gate per index of a head-dim
  group (q/k dims; v dims = the proj input) or MLP hidden group. A head dim's gate is shared by all heads
  of the block (vitcc keeps the same head-dim indices in every head), so pruning stays balanced per head;
  the unofficial code prunes head dims unevenly and scrambles heads: not copied. A q/k dim's gate scales
  both q and k (its effect on the logits is gate^2);
- the qkv and fc1 *inputs* are the residual stream in vitcc's coupled groups (pruning them per layer
  would need per-consumer copies of the stream), so they are not gated: departure from the paper;
- training: `vitcc.train.finetune` (AdamW, cosine, no distillation) for `epochs` (pass option, else
  `options["sparsity_epochs"]`, else 1 epoch), the L1 term `lam` (default 1e-4) added to every step;
- scores are |gate|; one global threshold over all gates (select's family "vtp"), so pruning lands where
  gates are small, typically the MLP (the paper's observation). `scores=norm` (ablation) ranks the same
  dimensions of the same trained model by group norm, uniformly per group, instead;
- removing the gates folds them into the producing Linear (rows and bias scaled by the gate): the
  model computes exactly what the gated model computed (to float rounding), and the masked reference
  (`program.original`) becomes that trained, folded model.
Other groups (residual, heads when asked with --prune) get magnitude fallback scores. Default kinds:
head_dim, mlp. Order: after lowrank (whose re-analysis would invalidate scores of earlier passes).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from vitcc.errors import VitccError
from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass
from vitcc.pipeline import Option

from ._common import (claim, default_kinds, epochs_of, fill_fallback, index_map_of, rebase, sparsity_train,
                      train_loader)
from ._common import SPARSITY_TRAINING_OPTIONS
from .magnitude import group_norms

GATED_KINDS = ("head_dim", "mlp")


class Gate(nn.Module):
    """`x * gate[index]` along the last axis; index -1 means not gated (factor 1)."""

    def __init__(self, gate: nn.Parameter, index: torch.Tensor):
        super().__init__()
        self.gate = gate
        self.register_buffer("index", index.long(), persistent=False)

    def scale(self) -> torch.Tensor:
        return torch.cat([self.gate, self.gate.new_ones(1)])[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale()


def _producers(program: Program, group) -> list[tuple[str, fx.Node]]:
    """Linear modules whose output rows lie on the group, each called exactly once in the graph."""
    out = []
    calls: dict[str, list[fx.Node]] = {}
    for n in program.gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    for m in group.members:
        if m.axis != 0 or not m.param.endswith(".weight"):
            continue
        target = m.param[: -len(".weight")]
        try:
            mod = program.gm.get_submodule(target)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and len(calls.get(target, [])) == 1:
            out.append((target, calls[target][0]))
    return out


def insert_gates(program: Program, groups) -> dict[str, list]:
    """Insert gate nodes for `groups`; returns group name -> [(gate module name, Linear target)]."""
    gm = program.gm
    placed: dict[str, list] = {}
    i = 0
    for g in groups:
        prods = _producers(program, g)
        if not prods:
            continue
        gate = nn.Parameter(torch.ones(g.size))
        for target, node in prods:
            name = f"vtp_gate_{i}"
            i += 1
            index = index_map_of(program, g, target + ".weight", 0)
            gm.add_submodule(name, Gate(gate, index))
            with gm.graph.inserting_after(node):
                gnode = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(gnode, delete_user_cb=lambda u, gnode=gnode: u is not gnode)
            placed.setdefault(g.name, []).append((name, target))
    gm.recompile()
    return placed


def fold_gates(program: Program, placed: dict[str, list]) -> None:
    """Scale each producing Linear's rows and bias by its gate, then remove the gate nodes and modules."""
    gm = program.gm
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    with torch.no_grad():
        for entries in placed.values():
            for name, target in entries:
                gate_mod = gm.get_submodule(name)
                lin = gm.get_submodule(target)
                s = gate_mod.scale().detach()
                lin.weight.mul_(s[:, None].to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.mul_(s.to(lin.bias.dtype))
                gnode = nodes[name]
                gnode.replace_all_uses_with(gnode.args[0])
                gm.graph.erase_node(gnode)
                gm.delete_submodule(name)
    gm.recompile()


def gate_params(program: Program, placed: dict[str, list]) -> dict[str, nn.Parameter]:
    return {gname: program.gm.get_submodule(entries[0][0]).gate for gname, entries in placed.items()}


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
            return lam * sum(p.abs().sum() for p in params)
        history = sparsity_train(program, "vtp", self.options, epochs=epochs, extra_loss=l1)
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
