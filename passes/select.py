"""select: turn scores into kept indices, under the graph's constraints and the user's budget.

`sparsity` removes that fraction of every prunable group of the `prune` kinds (uniform), or with
`target=params|macs` the uniform fraction is searched so that the compact model loses that fraction of
parameters or MACs. `scope=global` (set by lamp) ranks channels of one kind across groups instead.
Counts tied by a fused reshape (q, k and v head dims of one qkv) stay equal; `align` rounds kept widths.
"""
from __future__ import annotations

import numpy as np
import torch

from vitcc.cost import estimate
from vitcc.errors import VitccError
from vitcc.groups import KINDS
from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass
from vitcc.spaces import find

MIN_KEEP = {"residual": 1, "heads": 1, "head_dim": 1, "mlp": 1, "other": 1}


@register_pass("select", kind="structural")
class Select(Pass):
    def run(self, program: Program) -> PassResult:
        opt = {**program.options, **self.options}
        if program.keep and not opt.get("sparsity"):
            return PassResult(modified=False, info={"selection": "given"})
        s = float(opt.get("sparsity", 0.0) or 0.0)
        if not 0.0 <= s < 1.0:
            raise VitccError(f"sparsity must be in [0, 1), got {s}")
        kinds = _kinds(opt.get("prune"))
        target = opt.get("target", "channels") or "channels"
        align = int(opt.get("align", 1) or 1)
        scope = opt.get("scope", "uniform")
        for g in program.groups:
            if g.name not in program.scores:
                program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
        choose = lambda frac: _select(program, frac, kinds, align, scope)
        if target == "channels":
            program.keep = choose(s)
        elif target in ("params", "macs"):
            program.keep = _search(program, s, choose, 0 if target == "params" else 1)
        else:
            raise VitccError(f"unknown target {target!r}; use channels, params or macs")
        return PassResult(info={"sparsity": s, "target": target})


def _kinds(prune) -> set[str]:
    if not prune:
        return set(KINDS) - {"other"}
    kinds = set(prune.split(",") if isinstance(prune, str) else prune)
    bad = kinds - set(KINDS)
    if bad:
        raise VitccError(f"unknown group kind(s) {sorted(bad)} in --prune; valid: {', '.join(KINDS)}")
    return kinds


def _search(program: Program, goal: float, choose, which: int) -> dict:
    base = estimate(program, {})[which]
    lo, hi, best = 0.0, 0.999, choose(0.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        keep = choose(mid)
        reduction = 1 - estimate(program, _by_root(program, keep))[which] / max(base, 1)
        if reduction < goal:
            lo = mid
        else:
            hi, best = mid, keep
    return best if goal > 0 else choose(0.0)


def _by_root(program: Program, keep: dict) -> dict:
    return {find(program.group(n).space).id: np.asarray(v) for n, v in keep.items()}


def _count(n: int, frac: float, kind: str, align: int) -> int:
    k = max(MIN_KEEP[kind], n - int(frac * n + 1e-9))  # never remove more than the fraction asked
    if align > 1 and kind != "heads" and n >= align:
        k = min(n, max(align, int(round(k / align)) * align))
    return k


def _select(program: Program, frac: float, kinds: set[str], align: int, scope: str) -> dict[str, np.ndarray]:
    prunable = [g for g in program.groups if g.prunable and g.kind in kinds]
    counts = {g.name: _count(g.size, frac, g.kind, align) for g in prunable}
    if scope == "global" and frac > 0:
        counts.update(_global_counts(program, prunable, frac, align))
    by_root = {find(g.space).id: g for g in program.groups}
    for spaces in program.coupling.equal_counts:
        members = [by_root.get(find(s).id) for s in spaces]
        if any(m is None for m in members):
            continue
        names = [m.name for m in members]
        if all(n in counts for n in names):
            k = min(counts[n] for n in names)
            counts.update({n: k for n in names})
        else:  # one of them must stay whole, so all of them do
            for n in names:
                counts.pop(n, None)
    keep = {}
    for name, k in counts.items():
        scores = program.scores[name]
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        keep[name] = np.sort(order.numpy())
    return keep


def _global_counts(program: Program, groups, frac: float, align: int) -> dict[str, int]:
    """One threshold per kind over scores that are comparable across groups (LAMP)."""
    counts = {}
    for kind in {g.kind for g in groups}:
        same = [g for g in groups if g.kind == kind]
        allscores = torch.cat([program.scores[g.name] for g in same])
        n_remove = int(round(frac * len(allscores)))
        if n_remove == 0:
            continue
        thresh = torch.sort(allscores).values[n_remove - 1]
        for g in same:
            removed = int((program.scores[g.name] <= thresh).sum())
            counts[g.name] = _count(g.size, removed / g.size, kind, align)
    return counts
