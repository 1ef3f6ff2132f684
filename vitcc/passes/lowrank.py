"""lowrank: low-rank attention projections + lighter MLP pruning, the hybrid of Kumar, "Vision Transformer
Compression with Structured Pruning and Low Rank Approximation" (2022, arXiv 2203.13444). No data needed.

What the paper **states**: pruning alone (VTP) mostly prunes the MLP and loses much accuracy; the hybrid
replaces the attention projections by low-rank approximations and prunes the MLP at a lower rate (50%
compression with +14% relative error increase, against 44% and +20% for pruning alone).

What vitcc **reconstructs**:
- every attention projection (an aten.linear whose weight rows carry heads/head dims: qkv, or q, k, v; or
  whose columns do: proj; its weight and bias read by that linear only) is replaced, by graph surgery on
  the captured aten graph, with two aten.linear nodes `in -> r -> out` from the truncated SVD
  `W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)` (the bias stays on the second). Their parameters are
  `<linear>.down.weight` and `<linear>.up.weight`/`.bias`: child modules of the old weight's owner, which
  loses `weight` and `bias` (nn.MultiheadAttention's packed `X.in_proj_weight` becomes `X.in_proj.down`
  and `X.in_proj.up`); shapes are propagated again and the analysis re-runs. The Frobenius error is exactly
  the energy of the discarded singular values. A factorisation only saves parameters while
  `r < in*out/(in+out)`; vitcc never builds one that does not (projections too small to save are left);
- the rank: `energy=E` (smallest rank keeping the fraction E of sum(sigma^2)) or `rank_ratio=q` (q times
  the break-even rank) fix it; by default it comes from the budget: the factorisation is built at the
  largest rank that saves parameters, each rank dimension is a group scored by its singular value, and
  select removes rank dimensions and MLP neurons together to meet `sparsity`/`target`;
- lighter MLP pruning: MLP neurons are scored by magnitude (a fallback score: `lowrank,vtp` takes vtp's
  gates for them, the paper's "MLP dims by vtp or magnitude") and pruned at `mlp_rate` (default 0.5)
  times the fraction removed from the ranks (only when the rank comes from the budget; with a fixed
  rank the MLP takes whatever the budget still needs). Default kinds: rank and mlp (the analysis gives the
  width between `down` and `up` the kind `rank`: nothing nonlinear lies between them);
- params/macs targets are measured against the model before factorisation (`options["cost_reference"]`);
- the masked reference (`program.original`) becomes the factorised model, so verify checks the pruning;
  `report["lowrank"]` gives, per projection, the rank bound and the relative error of the factorisation.
Order: **lowrank first** in `--passes`: it changes the graph and re-runs the analysis, so scores written
before it would name stale groups (it refuses to run after another method pass).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from vitcc.search.cost import estimate
from vitcc.analysis.rulekit import named_arg
from vitcc.errors import VitccError
from vitcc.ir.program import ANALYSES, Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass
from vitcc.analysis.refresh import refresh

from vitcc.ir.types import attr_at
from vitcc.passes._common import claim, default_kinds, fill_fallback, linear_nodes, module_families, rebase


aten = torch.ops.aten


def break_even(in_f: int, out_f: int) -> int:
    """Largest rank whose factorisation has fewer weights than the dense matrix: r (in + out) < in * out."""
    return (in_f * out_f - 1) // (in_f + out_f)


def factorise(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(down (r, in), up (out, r), singular values) with up @ down the best rank-r approximation."""
    W = weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sq = S[:rank].sqrt()
    down = sq[:, None] * Vh[:rank]
    up = U[:, :rank] * sq[None, :]
    return down.to(weight.dtype), up.to(weight.dtype), S


def choose_rank(S: torch.Tensor, in_f: int, out_f: int, energy=None, rank_ratio=None) -> int:
    r_max = min(break_even(in_f, out_f), len(S))
    if energy is not None:
        e = float(energy)
        if not 0.0 < e <= 1.0:
            raise VitccError(f"lowrank{{energy={energy}}}: expected a fraction in (0, 1]")
        cum = torch.cumsum(S.double() ** 2, 0) / (S.double() ** 2).sum().clamp_min(1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(e - 1e-12, dtype=cum.dtype, device=cum.device)).item()) + 1
    elif rank_ratio is not None:
        q = float(rank_ratio)
        if not 0.0 < q <= 1.0:
            raise VitccError(f"lowrank{{rank_ratio={rank_ratio}}}: expected a fraction in (0, 1]")
        r = int(math.floor(q * in_f * out_f / (in_f + out_f)))
    else:
        r = r_max
    return max(1, min(r, r_max))


def attention_projections(program: Program) -> list[tuple[str, fx.Node]]:
    """(linear name, its aten.linear node) of every attention projection: a QKV or PRJ weight read by one
    linear only. The linear name is what its factors are registered under: the weight's owner for
    `X.weight` (`blocks.0.attn.qkv`), `X.in_proj` for a packed `X.in_proj_weight` (nn.MultiheadAttention)."""
    by_weight = linear_nodes(program.gm)
    out = []
    for wname, fam in module_families(program).items():
        base = _factor_base(program.gm, wname)
        if fam in ("QKV", "PRJ") and wname in by_weight and base is not None:
            out.append((base, by_weight[wname]))
    return out


def _factor_base(gm: fx.GraphModule, weight: str) -> str | None:
    """Where a weight's factors go: its owner for `X.weight`, a new child `X.p` for `X.p_weight`."""
    if weight.endswith(".weight"):
        base = weight[: -len(".weight")]
        holder = gm.get_submodule(base) if base else gm
        return None if hasattr(holder, "down") or hasattr(holder, "up") else base
    if weight.endswith("_weight"):
        base = weight[: -len("_weight")]
        owner, leaf = _owner_and_leaf(gm, base)
        return None if hasattr(owner, leaf) else base
    return None


def _factor_module(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A parameter holder like the captured graph's owners: `.weight` (and `.bias`), no forward."""
    m = nn.Module()
    m.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone())
    return m


def replace_linear(gm: fx.GraphModule, target: str, node: fx.Node, down: torch.Tensor, up: torch.Tensor) -> None:
    """Swap the aten.linear `node` (weight `target.weight`) for two: `target.down` (no bias), then `target.up`
    (the old bias). The new parameters live in child modules of the old weight's owner."""
    owner = _holder(gm, target)
    x, w_node, b_node = (named_arg(node, n) for n in ("input", "weight", "bias"))
    bias = attr_at(gm, b_node.target) if b_node is not None else None
    owner.add_module("down", _factor_module(down, None))
    owner.add_module("up", _factor_module(up, bias))
    g = gm.graph
    with g.inserting_before(node):
        down_w = g.get_attr(target + ".down.weight")
        up_w = g.get_attr(target + ".up.weight")
        up_b = g.get_attr(target + ".up.bias") if bias is not None else None
        d = g.call_function(aten.linear.default, (x, down_w))
    node.args = (d, up_w, up_b) if bias is not None else (d, up_w)
    node.kwargs = {}
    for old in (w_node, b_node):
        if old is not None:
            g.erase_node(old)
            delattr(*_owner_and_leaf(gm, old.target))


def _holder(gm: fx.GraphModule, target: str) -> nn.Module:
    """The module `target`, created (empty) where it does not exist yet."""
    parent, leaf = _owner_and_leaf(gm, target)
    if not hasattr(parent, leaf):
        parent.add_module(leaf, nn.Module())
    return getattr(parent, leaf)


def _owner_and_leaf(gm: fx.GraphModule, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


@register_pass("lowrank")
class Lowrank(Pass):
    """Truncated-SVD attention projections plus lighter MLP pruning (Kumar 2022)."""
    options_spec = (Option("energy", float, None, "fix each rank to keep this fraction of sum(sigma^2)"),
                    Option("rank_ratio", float, None, "fix each rank to this times the break-even rank"),
                    Option("mlp_rate", float, 0.5, "MLP fraction relative to the ranks' (budget mode)"))

    def requires(self, program: Program) -> None:
        if program.scores:
            raise VitccError("lowrank changes the graph and re-runs the analysis: put it first in --passes "
                             "(e.g. lowrank,vtp), scores of earlier passes would name stale groups")

    def run(self, program: Program) -> PassResult:
        energy, ratio = self.options.get("energy"), self.options.get("rank_ratio")
        if energy is not None and ratio is not None:
            raise VitccError("lowrank: give energy or rank_ratio, not both")
        fixed = energy is not None or ratio is not None
        mlp_rate = float(self.options.get("mlp_rate", 0.5))
        if mlp_rate < 0:
            raise VitccError(f"lowrank{{mlp_rate={mlp_rate}}} must be >= 0")
        gm = program.gm
        program.options.setdefault("cost_reference", estimate(program, {}))
        with torch.no_grad():
            before = gm(*program.example_inputs)
        done, singular = {}, {}
        for target, node in attention_projections(program):
            weight = attr_at(gm, named_arg(node, "weight").target)
            out_f, in_f = weight.shape
            if break_even(in_f, out_f) < 1:
                continue
            S = torch.linalg.svdvals(weight.detach().double())
            r = choose_rank(S, in_f, out_f, energy, ratio)
            down, up, S = factorise(weight, r)
            total = float((S ** 2).sum())
            done[target] = {"in": in_f, "out": out_f, "rank": r, "break_even": break_even(in_f, out_f),
                            "params_before": in_f * out_f, "params_after": r * (in_f + out_f),
                            "energy_kept": float((S[:r] ** 2).sum()) / max(total, 1e-300),
                            "relative_fro_error": math.sqrt(max(0.0, float((S[r:] ** 2).sum())) / max(total, 1e-300))}
            singular[target] = S[:r].float()
            replace_linear(gm, target, node, down, up)
        if not done:
            raise VitccError("lowrank found no attention projection it can factorise with fewer parameters")
        gm.graph.lint()
        gm.recompile()
        refresh(program, "shapes", "coupling")  # the rank groups are scored below, so not left to the manager
        rebase(program)
        with torch.no_grad():
            after = gm(*program.example_inputs)
        rank_groups = {}
        for g in program.groups:
            for m in g.members:
                t = m.param[: -len(".down.weight")] if m.param.endswith(".down.weight") else None
                if t in done and m.axis == 0:
                    rank_groups[g.name] = t
        program.options["lowrank"] = {"rank_groups": sorted(rank_groups), "projections": done}
        kinds = default_kinds(program, ("rank", "mlp"))
        for name, t in rank_groups.items():
            g = program.group(name)
            if fixed:
                g.frozen = f"lowrank: rank fixed by {'energy' if energy is not None else 'rank_ratio'}"
            claim(program, "lowrank:rank", name, singular[t])
        if not fixed:
            rates = program.options.setdefault("group_rate", {})
            for g in program.groups:
                if g.kind == "mlp":
                    rates[g.name] = mlp_rate
        fill_fallback(program, "lowrank")
        program.report["lowrank"] = {
            "mode": "energy" if energy is not None else "rank_ratio" if ratio is not None else "budget",
            "energy": energy, "rank_ratio": ratio, "mlp_rate": None if fixed else mlp_rate,
            "projections": done, "output_change_max_abs": float((after - before).abs().max()),
            "kinds": sorted(kinds)}
        return PassResult(info={"factorised": len(done)}, preserved=ANALYSES)
