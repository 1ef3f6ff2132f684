"""The masked reference: the original graph with removed channels forced to zero.

Semantics (docs/ARCHITECTURE.md): a removed channel is zero wherever its space appears; a norm over a
space with removed channels takes its statistics over the kept channels only; attention keeps the
original scale (the original graph is run unchanged, so it does).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .coupling import Coupling, is_ttype
from .ir import axis_mask


class MaskedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, coupling: Coupling, keep: dict[int, np.ndarray]):
        super().__init__(gm)
        self.masks: dict[str, list[np.ndarray | None]] = {}
        self._cache: dict = {}
        for name, t in coupling.types.items():
            if is_ttype(t):
                masks = [axis_mask(ax, keep, coupling.aliases) for ax in t]
                if any(m is not None for m in masks):
                    self.masks[name] = masks

    def _mask(self, name: str, like: torch.Tensor, dims: range | None = None) -> torch.Tensor | None:
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
        out = self._masked_norm(n)
        if out is None:
            out = super().run_node(n)
        m = self._mask(n.name, out)
        return out * m if m is not None else out

    def _masked_norm(self, n: fx.Node) -> torch.Tensor | None:
        """LayerNorm/RMSNorm whose normalized axes lost channels: statistics over the kept ones."""
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            if not isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
                return None
            k, w, b, eps = len(mod.normalized_shape), mod.weight, getattr(mod, "bias", None), mod.eps
            rms = not isinstance(mod, nn.LayerNorm)
        elif n.op == "call_function" and n.target in (F.layer_norm, getattr(F, "rms_norm", None)):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            k = len(args[1])
            rms = n.target is not F.layer_norm
            rest = list(args[2:]) + [None] * 3
            w = kwargs.get("weight", rest[0])
            b = None if rms else kwargs.get("bias", rest[1])
            eps = kwargs.get("eps", rest[1] if rms else rest[2])
            eps = 1e-5 if eps is None else eps
        else:
            return None
        x = self.env[n.args[0]]
        m = self._mask(n.name, x, range(x.dim() - k, x.dim()))
        if m is None:
            return None
        dims = tuple(range(x.dim() - k, x.dim()))
        count = m.expand(x.shape).sum(dims, keepdim=True)
        x = x * m
        if rms:
            var = (x * x).sum(dims, keepdim=True) / count
            y = x * torch.rsqrt(var + (eps if eps is not None else torch.finfo(x.dtype).eps))
        else:
            mean = x.sum(dims, keepdim=True) / count
            xc = (x - mean) * m
            var = (xc * xc).sum(dims, keepdim=True) / count
            y = xc * torch.rsqrt(var + eps)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y


def run_masked(program, keep: dict[int, np.ndarray], *inputs: torch.Tensor) -> Any:
    with torch.no_grad():
        return masked_reference(program, keep).run(*inputs)


def masked_reference(program, keep: dict[int, np.ndarray]) -> MaskedInterpreter:
    """Build once, run on many inputs: the masks are computed on first use and kept."""
    return MaskedInterpreter(program.original, program.coupling, keep)
