"""The masked reference: the original graph with removed channels forced to zero.

Semantics (docs/ARCHITECTURE.md): a removed channel is zero wherever its space appears; a norm over a
space with removed channels takes its statistics over the kept channels only; attention keeps the
original scale (the original graph is run unchanged, so it does). Ops whose masked semantics differ from
running them on zeroed inputs say so in the op table (`OpInfo.masked`). A removed residual branch
(vitcc.branches) has its output zeroed (`zeroed`), so the add that puts it on the stream contributes nothing.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from .coupling import Coupling, is_ttype
from .ir import axis_mask
from .ops import OpTable


class MaskedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, coupling: Coupling, keep: dict[int, np.ndarray], ops: OpTable,
                 zeroed: Iterable[str] = ()):
        super().__init__(gm)
        self.ops = ops
        self.zeroed = frozenset(zeroed)  # nodes whose output is zero: the outputs of removed branches
        self.masks: dict[str, list[np.ndarray | None]] = {}
        self._cache: dict = {}
        for name, t in coupling.types.items():
            if is_ttype(t):
                masks = [axis_mask(ax, keep, coupling.aliases) for ax in t]
                if any(m is not None for m in masks):
                    self.masks[name] = masks

    def mask(self, name: str, like: torch.Tensor, dims: range | None = None) -> torch.Tensor | None:
        """The keep-mask of a node's output over `dims`, built once and broadcastable against it."""
        masks = self.masks.get(name)
        if masks is None or not isinstance(like, torch.Tensor) or len(masks) != like.dim():
            return None
        dims = tuple(dims if dims is not None else range(like.dim()))
        key = (name, dims, like.dtype)
        if key not in self._cache:
            out = torch.ones((), dtype=like.dtype)
            for d in dims:
                if masks[d] is not None:
                    shape = [1] * like.dim()
                    shape[d] = -1
                    out = out * torch.as_tensor(masks[d], dtype=like.dtype).reshape(shape)
            self._cache[key] = out
        return self._cache[key]

    def run_node(self, n: fx.Node) -> Any:
        out = None
        info = self.ops.get(n.target) if n.op == "call_function" else None
        if info is not None and info.masked is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = info.masked(self, n, args, kwargs)
        if out is None:
            out = super().run_node(n)
        if n.name in self.zeroed:
            return torch.zeros_like(out)
        m = self.mask(n.name, out)
        # where, not multiply: a removed position is zero even where the op made it NaN (0/0 after masking)
        return torch.where(m != 0, out, torch.zeros((), dtype=out.dtype)) if m is not None else out


def run_masked(program, keep: dict[int, np.ndarray], *inputs: torch.Tensor) -> Any:
    with torch.no_grad():
        return masked_reference(program, keep).run(*inputs)


def masked_reference(program, keep: dict[int, np.ndarray]) -> MaskedInterpreter:
    """Build once, run on many inputs: the masks are computed on first use and kept."""
    return MaskedInterpreter(program.original, program.coupling, keep, program.ops,
                             zeroed=program.removed_outputs(keep))
