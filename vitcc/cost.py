"""Analytic parameter and MAC counts of the compact model for a candidate selection, without building it.

Select uses these to turn `--target params|macs` into per-group widths; reports use the measured counts
of vitcc.metrics instead. MACs per op come from the op table's `macs` entries.
"""
from __future__ import annotations

import math

import numpy as np
import torch.fx as fx

from .coupling import is_ttype
from .ir import CompactShapes, Program, axis_count


def estimate(program: Program, keep: dict[int, np.ndarray]) -> tuple[int, int]:
    """(params, MACs) under `keep` (group-root id -> kept indices; a `KeptByRoot` also removes branches)."""
    c = program.coupling
    gone, gone_params = program.removed_nodes(keep), program.removed_params(keep)
    count = lambda t: math.prod(axis_count(ax, keep, c.aliases) for ax in t)
    params = sum(count(t) for name, t in c.params.items() if name not in gone_params and _is_param(program.gm, name))
    shapes = CompactShapes(program, keep)
    macs = 0
    for node in program.gm.graph.nodes:
        if node.op != "call_function" or node.name in gone or not is_ttype(c.types.get(node.name)):
            continue
        info = program.ops.get(node.target)
        if info is not None and info.macs is not None:
            macs += info.macs(node, shapes)
    return int(params), int(macs)


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False
