"""Cost models: what a candidate selection costs, one number, without building the compact model.

The budget search (vitcc.search.budget) asks a cost model for the cost of candidate selections (by
group-root id, a `KeptByRoot`) and for the dense cost, and removes the goal fraction of it. Parameters
and MACs are analytic (the op table's `macs` entries at the compact shapes); a latency table
(vitcc.search.latency_table) is another cost model. Reports use the measured counts of vitcc.metrics instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch.fx as fx

from vitcc.ir.types import is_ttype
from vitcc.ir.shapes import CompactShapes, axis_count
from vitcc.ir.program import Program
from vitcc.ir.selection import KeptByRoot


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


class CostModel:
    """What the budget search removes a fraction of: a cost per candidate selection (by group-root id), the
    dense cost, a name for messages, and how many steps past the uniform fraction the search tries each kind
    (a cost that does not follow MACs, like latency, rewards spending the budget unevenly)."""
    what: str = "cost"
    further_steps: int = 0

    def __call__(self, keep: KeptByRoot) -> float:
        raise NotImplementedError

    def dense(self) -> float:
        return self(KeptByRoot())

    def out_of_reach(self, goal: float, most: float, kinds: set[str]) -> str:
        return (f"removing {goal:.0%} of the {self.what} is out of reach: pruning every group of the kinds "
                f"{', '.join(sorted(kinds))} to its minimum removes {most:.0%}; ask for less or prune more kinds")

    def report(self, keep: KeptByRoot) -> dict:
        """What the report shows of the chosen selection (a measured model says what it predicted)."""
        return {}

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """The setting the cost is measured in, around the whole search (a latency model's thread count)."""
        yield


@dataclass
class FunctionCost(CostModel):
    """Any function of a selection as a cost model (tests, experiments, users' own costs)."""
    fn: Callable[[KeptByRoot], float]
    what: str = "cost"
    further_steps: int = 0
    base: float | None = None

    def __call__(self, keep: KeptByRoot) -> float:
        return self.fn(keep)

    def dense(self) -> float:
        return self.fn(KeptByRoot()) if self.base is None else self.base


@dataclass
class AnalyticCost(CostModel):
    """Parameters or MACs of the compact model (`estimate`), against the dense model or a reference (lowrank
    measures against the model before it factorised)."""
    program: Program
    what: str  # "params" or "macs"
    reference: float | None = None
    further_steps: int = 0

    def __call__(self, keep: KeptByRoot) -> float:
        return estimate(self.program, keep)[0 if self.what == "params" else 1]

    def dense(self) -> float:
        return self(KeptByRoot()) if self.reference is None else self.reference
