"""Channel scores from the weights alone: the Lp norm of every parameter slice a channel owns, summed over its
group. The magnitude pass scores with it, methods score the groups they do not own with it (their fallback),
and the select pass with it scores what nobody scored, so the search never ranks a channel by position.
"""
from __future__ import annotations

import numpy as np
import torch

from vitcc.ir.program import Program
from vitcc.ir.spaces import index_map


def group_norms(program: Program, group, p: float = 2.0, cache: dict | None = None) -> torch.Tensor:
    """Per-index sum of |w|^p over every parameter slice laid on the group (not yet the p-th root).

    `cache` keeps each parameter's sums along every axis across groups: a weight is read once, not per group
    and axis (a qkv weight lies on the residual group by its columns and on head groups by its rows).
    """
    cache = {} if cache is None else cache

    def rows(name: str, w: torch.Tensor, axis: int) -> torch.Tensor:
        key = (name, p)
        if key not in cache:
            cache[key] = axis_sums(w.detach(), p)
        return cache[key][axis]
    if "tensors" not in cache:
        cache["tensors"] = dict(program.gm.named_parameters())
    return group_slice_sums(program, group, rows, tensors=cache["tensors"])


def axis_sums(w: torch.Tensor, p: float) -> list[torch.Tensor]:
    """For every axis of `w`, the sum of |w|^p over all other axes (float64), from one elementwise pass.

    |w|^p is formed once in the weight's precision (at least float32) and reduced there: scores end as
    float32, and a copy in float64 would cost more than every other step of scoring together.
    """
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()
    a = w.abs() if p == 1 else w.square() if p == 2 else w.abs().pow(p)
    dims = range(a.dim())
    return [(a.sum([d for d in dims if d != axis]) if a.dim() > 1 else a).double() for axis in dims]


def group_slice_sums(program: Program, group, rows, tensors: dict | None = None) -> torch.Tensor:
    """Per-index sum, over every member (parameter, axis) of the group, of `rows(name, tensor, axis)`: one
    value per position of that axis (e.g. the slice's sum of |w|^p, or of w * grad), mapped to group indices.

    `tensors` defaults to the program's parameters; members without a tensor there are skipped.
    """
    total = torch.zeros(group.size, dtype=torch.float64)  # scores live on the CPU, beside the selection
    state = dict(program.gm.named_parameters()) if tensors is None else tensors
    for m in group.members:
        w = state.get(m.param)
        if w is None:
            continue
        axis_space = program.coupling.params[m.param][m.axis]
        idx = torch.as_tensor(axis_index_map(axis_space, group.space))
        r = rows(m.param, w, m.axis)
        if r is None:
            continue
        sel = idx >= 0
        total.index_add_(0, idx[sel], r.detach().double().cpu()[sel])
    return total


def axis_index_map(axis, leaf) -> np.ndarray:
    """For every position of a parameter axis, its index in the group's leaf space (-1: not in the group)."""
    out = np.full(1, -1, dtype=np.int64)
    for f in axis:
        m = index_map(f, leaf)
        out = np.maximum(out[:, None], m[None, :]).reshape(-1)
    return out
