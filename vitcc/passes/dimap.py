"""dimap: data-independent module-aware pruning (He & Zhou, "Data-independent Module-aware Pruning for
Hierarchical Vision Transformers", ICLR 2024). No data needed.

What the paper **states**:
- modules are families of layers across all blocks and stages: QKV (every attention qkv projection), PRJ
  (every attention output projection), MLP (every fc1 and fc2); patch embedding, patch merging, norms and
  the classifier are never pruned;
- a weight's score needs no data: sort a layer's weights by magnitude, largest first, and score
  `w_j^2 / sum_{i<=j} w_i^2` (its share of the energy of the weights at least as large as it: a bound on
  the information distortion of removing it);
- scores are compared only inside a module family (one threshold per family), so that small weights of a
  family (e.g. early "local" attention) are not wiped out by a comparison with other families;
- it prunes individual weights (unstructured masks), one shot, then fine-tunes.

What vitcc **reconstructs / adds**:
- families are found from the graph, not from layer names: a linear weight whose rows carry attention heads or
  head dims is QKV, one whose columns carry them is PRJ, one touching an MLP hidden group is MLP;
- `granularity=channel` (the default, NOT the paper): the same distortion score on whole channels, with
  a channel's group energy (sum of squares of every slice it owns) in place of `w^2`, sorted inside its
  layer (group); one threshold per family and structure: attention heads, attention head dims, MLP
  neurons. The residual stream is not scored (pruning it would prune the patch embedding and the norms,
  which the paper keeps). Observation: per layer this score is the LAMP score (same formula; LAMP sorts
  ascending); what distinguishes DIMAP is where thresholds are shared (per module family, not one ranking);
- `granularity=weight` is the paper as written: weight masks in the QKV, PRJ and MLP weights (biases
  kept), shapes unchanged, zeros written into the model (and into the masked reference, so verify
  compares like with like). It takes the whole budget: `sparsity` is the fraction of each family's weights
  removed (`target=params|macs`: the fraction of all parameters, spread evenly over the families), the
  structured selection keeps every channel, `report["weight_sparsity"]` says what was removed (per family
  and per weight, which the summary and the report's picture show) and
  `options["weight_masks"]` holds the masks; `vitcc.compile(..., finetune_epochs=N)` re-applies them after
  every optimizer step (`vitcc.training.finetune.keep_zeros`), so fine-tuning keeps the zeros;
- `scope=module` (default) | `global` (one ranking across all families: the ablation of the paper's
  module-aware claim) | `layer` (per-group uniform fractions).

Composition: dimap's primary structures are head dims and MLP neurons; heads are scored by dimap only
when no earlier pass scored them as primary (so `gohsp,dimap` = heads by gohsp's Markov ranking, head
dims and neurons by dimap, in either order). Later passes win for groups both score as primary.
"""
from __future__ import annotations

import torch

from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass

from vitcc.passes._common import budget, claim, default_kinds, fill_fallback, is_rank_group, module_families, owned_by_other, rebase
from vitcc.search.scores import group_norms

FAMILY_OF_KIND = {"heads": "attention heads", "head_dim": "attention head dims", "mlp": "MLP neurons"}


def distortion(energy: torch.Tensor) -> torch.Tensor:
    """Score per entry: energy / (sum of the energies at least as large), sorted largest first."""
    e = energy.double().reshape(-1)
    order = torch.argsort(e, descending=True, stable=True)
    cum = torch.cumsum(e[order], 0).clamp_min(1e-300)
    out = torch.empty_like(e)
    out[order] = e[order] / cum
    return out.reshape(energy.shape)


@register_pass("dimap")
class Dimap(Pass):
    """Data-independent module-aware scores, one threshold per module family (He & Zhou, ICLR 2024)."""
    options_spec = (Option("granularity", str, "channel", "prune whole channels, or weights as the paper "
                           "(unstructured masks)", choices=("channel", "weight")),
                    Option("scope", str, "module", "one threshold per module family, one for all, or per layer",
                           choices=("module", "global", "layer")))

    def run(self, program: Program) -> PassResult:
        gran = str(self.option("granularity"))
        scope = str(self.option("scope"))
        if scope not in ("module", "global", "layer"):
            raise VitccError(f"dimap{{scope={scope}}}: expected module, global or layer")
        if gran == "weight":
            return self._weights(program, scope)
        if gran != "channel":
            raise VitccError(f"dimap{{granularity={gran}}}: expected channel or weight")
        kinds = default_kinds(program, ("heads", "head_dim", "mlp"))
        cache: dict = {}
        scored = []
        for g in program.groups:
            if g.kind not in FAMILY_OF_KIND or is_rank_group(program, g):
                continue
            if g.kind == "heads" and owned_by_other(program, "dimap", g.name):
                continue  # heads: secondary for dimap (gohsp's ranking keeps them)
            score = distortion(group_norms(program, g, 2.0, cache))
            family = None if scope == "layer" else ("dimap" if scope == "global" else "dimap:" + FAMILY_OF_KIND[g.kind])
            if claim(program, "dimap", g.name, score, family=family):
                scored.append(g.name)
        fill_fallback(program, "dimap")
        return PassResult(info={"granularity": "channel", "scope": scope, "scored": len(scored),
                                "kinds": sorted(kinds)})

    # -- the paper as written: unstructured masks ------------------------------------------------------------

    def _weights(self, program: Program, scope: str) -> PassResult:
        s = budget(program)
        fam = module_families(program)
        params = dict(program.gm.named_parameters())
        total = sum(p.numel() for p in params.values())
        family_total = sum(params[n].numel() for n in fam)
        frac = s
        target = program.options.get("target", "channels") or "channels"
        if target in ("params", "macs"):
            frac = s * total / max(family_total, 1)
            if frac >= 1.0:
                raise VitccError(f"dimap{{granularity=weight}} cannot remove {s:.0%} of the parameters: the QKV, "
                                 f"PRJ and MLP weights are only {family_total / total:.0%} of them")
        elif target != "channels":
            raise VitccError(f"dimap{{granularity=weight}} supports target channels, params or macs, not {target!r}")
        scores = {n: distortion(params[n].detach().pow(2)) for n in fam}
        buckets: dict[str, list[str]] = {}
        for n, f in fam.items():
            key = {"module": f, "global": "all", "layer": n}[scope]
            buckets.setdefault(key, []).append(n)
        masks = {}
        for names in buckets.values():
            allscores = torch.cat([scores[n].reshape(-1) for n in names])
            n_remove = int(frac * len(allscores) + 1e-9)
            if n_remove == 0:
                continue
            # exactly n_remove entries, the lowest scores (ties broken by position)
            order = torch.argsort(allscores, stable=True)[:n_remove]
            flat = torch.ones(len(allscores), dtype=torch.bool, device=allscores.device)
            flat[order] = False
            offset = 0
            for n in names:
                k = scores[n].numel()
                masks[n] = flat[offset:offset + k].reshape(scores[n].shape)
                offset += k
        removed = {}
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m.to(params[n].dtype))
                removed[n] = int((~m).sum())
        rebase(program)  # the masked reference is the masked-weight model: verify compares like with like
        by_family: dict[str, list[int]] = {}
        for n, f in fam.items():
            r = by_family.setdefault(f, [0, 0])
            r[0] += removed.get(n, 0)
            r[1] += params[n].numel()
        program.report["weight_sparsity"] = {
            "granularity": "weight", "scope": scope, "target": target, "requested": s,
            "per_family": {f: r[0] / max(r[1], 1) for f, r in sorted(by_family.items())},
            "of_family_weights": sum(removed.values()) / max(family_total, 1),
            "of_all_parameters": sum(removed.values()) / max(total, 1),
            "zeros": sum(removed.values()),
            "per_weight": {n: {"family": f, "zeros": removed.get(n, 0), "size": params[n].numel()}
                           for n, f in fam.items()}}
        program.options["weight_masks"] = masks
        program.options["sparsity"] = 0.0  # structured selection: keep every channel
        return PassResult(info={"granularity": "weight", "removed": sum(removed.values())})
