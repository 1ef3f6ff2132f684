"""Analytic parameter and MAC counts of the compact model for a candidate selection, without building it.

Select uses these to turn `--target params|macs` into per-group widths; reports use the measured counts
of vitcc.metrics instead.
"""
from __future__ import annotations

import math

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .coupling import is_ttype
from .ir import Program, axis_count


def estimate(program: Program, keep: dict[int, np.ndarray]) -> tuple[int, int]:
    c = program.coupling
    aliases = c.aliases
    count = lambda t: math.prod(axis_count(ax, keep, aliases) for ax in t)
    params = sum(count(t) for name, t in c.params.items() if _is_param(program.gm, name))
    macs = 0
    modules = dict(program.gm.named_modules())
    for node in program.gm.graph.nodes:
        t = c.types.get(node.name)
        if not is_ttype(t):
            continue
        ins = [c.types.get(a.name) for a in node.all_input_nodes]
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.Linear) or node.target is F.linear:
            w = c.params.get(f"{node.target}.weight") if mod is not None else ins[1]
            macs += count(t) * axis_count(w[1], keep, aliases)
        elif isinstance(mod, nn.Conv2d):
            w = c.params[f"{node.target}.weight"]
            macs += count(t) * math.prod(axis_count(ax, keep, aliases) for ax in w[1:])
        elif node.target in ("matmul", "bmm") or getattr(node.target, "__name__", "") in ("matmul", "bmm"):
            macs += count(t) * axis_count(ins[0][-1], keep, aliases)
        elif node.target is F.scaled_dot_product_attention:
            q, k, v = ins[:3]
            lq, lk = axis_count(q[-2], keep, aliases), axis_count(k[-2], keep, aliases)
            batch = count(t) // max(1, lq * axis_count(v[-1], keep, aliases))
            macs += batch * lq * lk * (axis_count(q[-1], keep, aliases) + axis_count(v[-1], keep, aliases))
    return int(params), int(macs)


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False
