"""magnitude: the Lp norm of everything a channel owns, summed over all members of its group."""
from __future__ import annotations

import torch

from vitcc.ir import Program
from vitcc.pipeline import Option, Pass, PassResult, register_pass
from vitcc.spaces import index_map


def group_norms(program: Program, group, p: float = 2.0, cache: dict | None = None) -> torch.Tensor:
    """Per-index sum of |w|^p over every parameter slice laid on the group (not yet the p-th root).

    `cache` keeps each parameter's per-row sums across groups: a qkv weight is read once, not per group.
    """
    cache = {} if cache is None else cache

    def rows(name: str, w: torch.Tensor, axis: int) -> torch.Tensor:
        key = (name, axis, p)
        if key not in cache:
            cache[key] = w.detach().double().abs().pow(p).movedim(axis, 0).reshape(w.shape[axis], -1).sum(1)
        return cache[key]
    return group_slice_sums(program, group, rows)


def group_slice_sums(program: Program, group, rows, tensors: dict | None = None) -> torch.Tensor:
    """Per-index sum, over every member (parameter, axis) of the group, of `rows(name, tensor, axis)`: one
    value per position of that axis (e.g. the slice's sum of |w|^p, or of w * grad), mapped to group indices.

    `tensors` defaults to the program's parameters; members without a tensor there are skipped.
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    state = dict(program.gm.named_parameters()) if tensors is None else tensors
    for m in group.members:
        w = state.get(m.param)
        if w is None:
            continue
        axis_space = program.coupling.params[m.param][m.axis]
        idx = torch.as_tensor(_axis_index_map(axis_space, group.space))
        r = rows(m.param, w, m.axis)
        if r is None:
            continue
        sel = idx >= 0
        total.index_add_(0, idx[sel], r.double()[sel])
    return total


def _axis_index_map(axis, leaf):
    import numpy as np
    out = np.full(1, -1, dtype=np.int64)
    for f in axis:
        m = index_map(f, leaf)
        out = np.maximum(out[:, None], m[None, :]).reshape(-1)
    return out


@register_pass("magnitude")
class Magnitude(Pass):
    """Group Lp norm (p=1 or 2, default 2), the uniform-magnitude baseline of the papers."""
    options_spec = (Option("p", float, 2, "norm order > 0: 1 or 2", check=lambda p: p > 0),)

    def run(self, program: Program) -> PassResult:
        p = float(self.option("p"))
        cache: dict = {}
        for g in program.groups:
            program.scores[g.name] = group_norms(program, g, p, cache).pow(1.0 / p).float()
        return PassResult(info={"p": p})
