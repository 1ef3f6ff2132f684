"""Latency tables that travel: one JSON file, measured on a device (`vitcc profile ... -o TABLE.json`,
vitcc.profiling.profile_table), read anywhere (`compile --target latency --latency-table TABLE.json`).

A table holds what the runtime runs, in units larger than ops where per-op sums do not predict (fusion under
torch.compile, launch overhead in eager mode at small batch, CUDA graph replay): each residual branch
(vitcc.analysis.branches) timed as a standalone module in the requested mode, at a grid of each of its
widths (its residual width and every channel group it owns), the other widths dense. Branches of the same
structure share one unit. What is not in a unit (patch embedding, head, the stream adds) is calibrated: the
whole model measured minus the sum of its units, at the dense widths and along every kind's grid.

A selection's latency is predicted without measuring anything:
- a unit: a floor that no width shrinks, plus the rest of its dense time times, per width, the measured ratio
  of that rest at that width (piecewise linear between grid points): widths of one GEMM multiply (heads x
  head dim, residual x MLP width) and so do their ratios. The floor (a launch, waking threads) is fitted to
  the unit timed with all its widths narrowed at once (`joint`), so the ratios do not compound a fixed cost;
- a removed branch: its unit is gone;
- the rest: its dense value plus, per lane (kind and slot, see `lanes`), a straight line in that lane's kept
  fraction, through the dense value and fitted to the lane's points (`rest_slope`); and per role of branches
  (`branch/attn`, `branch/mlp`), a line in the share of their unit time kept: what removing one saves beyond
  its unit (a branch costs more inside the whole model than alone).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
import torch
import torch.fx as fx

from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.ir.selection import BRANCH, KeptByRoot
from vitcc.ir.spaces import find, spaces_of
from vitcc.ir.types import attr_at, is_ttype
from vitcc.search.cost import CostModel

__all__ = ["FORMAT", "model_fingerprint", "branch_slots", "unit_signature", "read_table", "write_table",
           "check_table", "lanes", "removal_lane", "kept_share", "TableCost"]

FORMAT = "vitcc-latency-table/1"
RESIDUAL = "residual"  # the slot of a unit's residual width; other slots are indices into Branch.groups
# how many steps past the uniform fraction the search tries each kind (latency does not follow MACs)
FURTHER_STEPS = 2


def model_fingerprint(gm: fx.GraphModule, example_inputs: tuple) -> dict[str, Any]:
    """What a table must match: the ops of the captured graph in order, its parameters' names and shapes, and
    the input shape without its batch (a table measured at batch 256 serves a compile traced at batch 1)."""
    h = hashlib.sha1()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            h.update(f"{n.target};".encode())
    for name, p in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    shapes = [list(getattr(x, "shape", ()))[1:] for x in example_inputs]
    h.update(json.dumps(shapes).encode())
    return {"fingerprint": h.hexdigest()[:16], "input_shape": shapes[0] if len(shapes) == 1 else shapes}


def _dense_gm(program: Program) -> fx.GraphModule:
    return program.original if program.original is not None else program.gm


def residual_group(program: Program, branch) -> str | None:
    """The residual group the branch's add puts its output on (Swin has one per stage)."""
    t = program.coupling.types.get(branch.add)
    if not is_ttype(t) or not t:
        return None
    roots = {find(s).id for s in spaces_of([t[-1]])}
    for g in program.groups:
        if g.kind == "residual" and find(g.space).id in roots:
            return g.name
    return None


def branch_slots(program: Program, branch) -> dict[str, str]:
    """Slot -> group name: the widths a unit is measured at (its residual width, then the groups it owns)."""
    slots = {}
    res = residual_group(program, branch)
    if res is not None:
        slots[RESIDUAL] = res
    for i, name in enumerate(branch.groups):
        slots[str(i)] = name
    return slots


def lanes(program: Program) -> dict[str, str]:
    """Group name -> the lane a table sweeps it in: its kind and its slot in its branch (`heads/1`,
    `head_dim/2`, `residual/residual`; `mlp/-` for a group no branch owns). The groups of one lane are
    narrowed together, so a unit's two groups of one kind (q/k and v head dims) are measured apart, unless a
    fused reshape ties them (timm's qkv): then they share a lane, and the unit's first slot in it holds the
    points."""
    out = {g.name: f"{g.kind}/-" for g in program.groups}
    for b in program.branches:
        for slot, g in branch_slots(program, b).items():
            out[g] = f"{program.group(g).kind}/{slot}"
    by_root = {find(g.space).id: g.name for g in program.groups}
    for spaces in program.coupling.equal_counts:  # groups tied by a fused reshape keep equal counts: one lane
        tied = [by_root[r] for r in dict.fromkeys(find(s).id for s in spaces) if r in by_root]
        lane = min(out[g] for g in tied) if tied else None
        for g in tied:
            out[g] = lane
    return out


def removal_lane(role: str) -> str:
    """The rest's lane of removing branches of one role (`branch/attn`, `branch/mlp`)."""
    return f"{BRANCH}/{role}"


def kept_share(branch_ms: Mapping[str, float], removed: Collection[str]) -> float:
    """A removal lane's kept fraction: the share of its branches' unit time (branch name -> its unit's dense ms)
    that stays, so a large branch (a Swin stage of wide blocks) weighs what it costs."""
    total = sum(branch_ms.values())
    return 1.0 - sum(ms for name, ms in branch_ms.items() if name in removed) / total if total > 0 else 1.0


def unit_signature(program: Program, branch) -> str:
    """Branches with the same ops, parameter shapes and widths share one unit (the blocks of a ViT do)."""
    gm = _dense_gm(program)
    nodes = {n.name: n for n in gm.graph.nodes}
    h = hashlib.sha1(branch.role.encode())
    for name in branch.nodes:
        n = nodes.get(name)
        if n is not None and n.op == "call_function":
            h.update(f"{n.target};".encode())
    for shape in param_shapes(gm, branch):
        h.update(f"{shape};".encode())
    for slot, g in branch_slots(program, branch).items():
        h.update(f"{slot}:{program.group(g).kind}:{program.group(g).size};".encode())
    return h.hexdigest()[:12]


def param_shapes(gm: fx.GraphModule, branch) -> tuple[tuple[int, ...], ...]:
    """The shapes of a residual branch's parameters in `gm` (() for one it no longer has: folded away)."""
    out = []
    for p in branch.params:
        try:
            out.append(tuple(attr_at(gm, p).shape))
        except AttributeError:
            out.append(())
    return tuple(out)


# --------------------------------------------------------------------------------------------- files

def write_table(table: Mapping[str, Any], path: str | Path) -> Path:
    """Write atomically: a reader never sees half a table."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A table from a path or a dict, its format checked (one-line errors for files that are not tables)."""
    if isinstance(source, Mapping):
        data, where = dict(source), "the latency table"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise VitccError(f"latency table {where} does not exist; write one with `vitcc profile MODEL -o {where}`")\
                from None
        except (OSError, ValueError) as e:
            raise VitccError(f"latency table {where} is not readable JSON ({type(e).__name__}); write it again "
                             "with `vitcc profile MODEL -o TABLE.json`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VitccError(f"{where} is not a vitcc latency table (format {FORMAT!r}); write one with "
                         "`vitcc profile MODEL -o TABLE.json`")
    for key in ("measured", "units", "branches", "dense_ms", "rest_ms", "rest"):
        if key not in data:
            raise VitccError(f"latency table {where} has no {key!r}; write it again with `vitcc profile`")
    return data


def check_table(table: Mapping[str, Any], program: Program, where: str = "the latency table") -> None:
    """The table was measured on this model: same graph fingerprint and input shape (batch aside)."""
    have = model_fingerprint(_dense_gm(program), program.example_inputs)
    m = table["measured"]
    if m.get("fingerprint") != have["fingerprint"] or m.get("input_shape") != have["input_shape"]:
        # another torch release may capture the same model as other ops: where the releases differ, say so
        there, here = m.get("torch", torch.__version__), torch.__version__
        same = there == here
        torch_there, torch_here = ("", "") if same else (f", torch {there}", f", torch {here}")
        raise VitccError(f"latency table {where} was measured on {m.get('model', '?')} (fingerprint "
                         f"{m.get('fingerprint')}, input {m.get('input_shape')}{torch_there}), not on this model "
                         f"(fingerprint {have['fingerprint']}, input {have['input_shape']}{torch_here}); profile "
                         f"this model{'' if same else ' under the torch that compiles it'}: "
                         "`vitcc profile MODEL -o TABLE.json`")
    missing = [b.name for b in program.branches if b.name not in table["branches"]]
    if missing:
        raise VitccError(f"latency table {where} has no unit for branch {missing[0]}; profile the model again")


# -------------------------------------------------------------------------------------------- model

def interp(points: list, x: float) -> float:
    """Piecewise linear through (width, ms) points; beyond them, the nearest segment's line (at least 0)."""
    pts = sorted((float(w), float(ms)) for w, ms in points)
    if len(pts) == 1:
        return pts[0][1]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if xs[0] <= x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    (x0, y0), (x1, y1) = (pts[0], pts[1]) if x < xs[0] else (pts[-2], pts[-1])
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0)) if x1 != x0 else y0


def unit_time(unit: Mapping[str, Any], widths: Mapping[str, int], dense_widths: Mapping[str, int],
              floor: float = 0.0) -> float:
    """A unit's ms at the given width per slot: what does not shrink (`floor`) plus the rest of its dense time
    times, per slot, the measured ratio of that rest at the slot's width (the others dense). A floor of 0
    multiplies the slots' ratios (widths of one GEMM multiply); a fixed cost per call (a launch, waking threads)
    shrinks with none of them."""
    dense_ms = float(unit["dense_ms"])
    variable = max(dense_ms - floor, 1e-12)
    ms = variable
    for slot, width in widths.items():
        pts = unit["slots"].get(slot)
        if not pts:
            continue
        at_dense = interp(pts, dense_widths[slot])
        if at_dense > 0:
            ms *= max(0.0, interp(pts, width) * dense_ms / at_dense - floor) / variable
    return floor + ms


def unit_floor(unit: Mapping[str, Any], steps: int = 64) -> float:
    """The floor that best predicts the unit timed with all its widths narrowed at once (its `joint` points,
    relative error, least squares), between 0 and the fastest the unit was seen; 0 for a table without them."""
    joint = unit.get("joint") or []
    if not joint:
        return 0.0
    dense_ms = float(unit["dense_ms"])
    fastest = min(ms * dense_ms / max(interp(pts, unit["widths"][slot]), 1e-12)
                  for slot, pts in unit["slots"].items() if pts for _, ms in pts)
    targets = [(widths, ms * dense_ms / ref) for widths, ms, ref in joint if ref > 0]

    def loss(floor: float) -> float:
        return sum((unit_time(unit, w, unit["widths"], floor) / t - 1) ** 2 for w, t in targets)
    return min((fastest * i / steps for i in range(steps)), key=loss)


def rest_slope(points: list) -> float:
    """ms the rest changes per unit of a lane's kept fraction: least squares through the dense point. The rest
    is the small difference of the measured whole and the units' sum, so each point carries the noise of both,
    and a search handed the points joined takes every dip of that noise for a saving. DeiT-S, 16 random
    selections in each of 3 runs (batch 1 and 8, 1 and 2 threads): median error 0.7-2.0 points, worst 4.0,
    where the joined points gave 2.9-4.2 and worst 6.3-15.4 (benchmarks/latency_prediction.py)."""
    at_dense = interp(points, 1.0)
    fs = np.array([float(f) - 1.0 for f, _ in points if float(f) < 1.0])
    ys = np.array([float(ms) - at_dense for f, ms in points if float(f) < 1.0])
    return float(fs @ ys / (fs @ fs)) if len(fs) else 0.0


class TableCost(CostModel):
    """Predicted latency from a table (`--latency-table`): nothing is measured, any machine can select for the
    device the table was measured on."""
    what = "latency"
    further_steps = FURTHER_STEPS

    def __init__(self, program: Program, table: Mapping[str, Any] | str | Path, where: str | None = None):
        self.where = where or (str(table) if not isinstance(table, Mapping) else "the latency table")
        self.table = read_table(table)
        self.program = program
        check_table(self.table, program, self.where)
        self.root = {g.name: find(g.space).id for g in program.groups}
        self.lane = lanes(program)
        self.units = [(b.name, self.table["branches"][b.name], branch_slots(program, b)) for b in program.branches]
        self.floors = {sig: unit_floor(u) for sig, u in self.table["units"].items()}
        self.rest_slopes = {lane: rest_slope(pts) for lane, pts in self.table["rest"].items() if pts}
        self.removal_ms: dict[str, dict[str, float]] = {}  # removal lane -> branch -> its unit's dense ms
        for name, sig, _ in self.units:
            unit = self.table["units"][sig]
            self.removal_ms.setdefault(removal_lane(unit["role"]), {})[name] = float(unit["dense_ms"])

    def _kept(self, keep: Mapping[int, Any], group: str) -> int:
        v = keep.get(self.root[group])
        return self.program.group(group).size if v is None else len(v)

    def unit_ms(self, signature: str, slots: dict[str, str], keep: Mapping[int, Any]) -> float:
        widths = {slot: self._kept(keep, group) for slot, group in slots.items()}
        dense = {slot: self.program.group(group).size for slot, group in slots.items()}
        return unit_time(self.table["units"][signature], widths, dense, self.floors[signature])

    def rest_ms(self, keep: Mapping[int, Any], removed: frozenset = frozenset()) -> float:
        gone = {g for b in self.program.branches if b.name in removed for g in b.groups}
        rest = float(self.table["rest_ms"])
        for lane, slope in self.rest_slopes.items():
            if lane in self.removal_ms:
                rest += slope * (kept_share(self.removal_ms[lane], removed) - 1.0)
                continue
            groups = [g for g in self.program.groups if self.lane[g.name] == lane and g.name not in gone]
            size = sum(g.size for g in groups)
            if size:
                rest += slope * (sum(self._kept(keep, g.name) for g in groups) / size - 1.0)
        return rest

    def __call__(self, keep: KeptByRoot) -> float:
        """Units plus rest. The rest may be negative: a unit timed on its own pays a call (a CUDA graph replay,
        a launch) that it does not pay inside the whole model; its floor holds that cost and the rest takes it
        back, so the prediction is the measured whole minus what the units save."""
        removed = getattr(keep, "removed", frozenset())
        units = sum(self.unit_ms(sig, slots, keep) for name, sig, slots in self.units if name not in removed)
        return max(0.0, float(units + self.rest_ms(keep, removed)))

    def out_of_reach(self, goal: float, most: float, kinds: set[str]) -> str:
        return (f"--target latency: removing {goal:.0%} of the latency is out of reach; by {self.where}, pruning "
                f"every group of the kinds {', '.join(sorted(kinds))} to its minimum removes {most:.0%} (of "
                f"{self.dense():.3g} ms predicted); ask for less or prune more kinds (branch)")

    def report(self, keep: KeptByRoot) -> dict:
        base, after = self.dense(), self(keep)
        return {"latency_model": {
            "table": self.where, "measured": dict(self.table["measured"]),
            "predicted_ms_before": base, "predicted_ms_after": after,
            "predicted_reduction": 1 - after / base if base > 0 else 0.0,
            "table_dense_ms": float(self.table["dense_ms"]), "rest_ms": float(self.table["rest_ms"])}}

