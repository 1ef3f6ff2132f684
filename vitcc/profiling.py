"""Measure a latency table (vitcc.search.latency_table) on a device: `vitcc profile MODEL -o TABLE.json`, and
`table_for`, the table `--target latency` measures where the model is when given none, kept in a cache.

Each residual branch is cut out of the compact graph vitcc builds at a grid of widths (an explicit selection,
given-selection, then the rewrite, fold and dce a real compile runs) into its own GraphModule, its inputs recorded
from a run of the whole model, and timed on the device in the mode the model will run in (eager, CUDA graph replay,
torch.compile). One kind is narrowed at a time, in every group of that kind at once, so one compile gives every
block's unit at that width; branches of the same structure are timed once. The whole model is timed at every point
too, which calibrates what the units do not hold. Then every width is narrowed at once, at a few fractions
(`JOINT_FRACTIONS`): how a unit's savings combine; and the whole model without some of the branches of each
role (`REMOVED_FRACTIONS`): what removing one saves beyond its unit. Every narrowed unit and model is timed as
a ratio to its dense self, the two alternating: a machine that slows down for a few seconds (a shared CPU) slows
both, where separate timings would put that drift into the table (DeiT-S on a shared 2-core CPU, 16 random
selections: median error 0.8-1.2 points, worst 4.6, where timing each alone gave medians of 1.3-6.9 and worsts up
to 19; benchmarks/results/latency_prediction*.md). Graphs are moved to the device and cast to the dtype to be
timed.
"""
from __future__ import annotations

import copy
import datetime
import gc
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from vitcc.deploy.runners import DTYPES, MODES, make_runner
from vitcc.deploy.timing import (cpu_clock_ok, cpu_model, heap_policy, ratios_to_reference, subnormal_policy,
                                 time_ratios, timing_on, with_batch)
from vitcc.devices import device_of, moved_copy, resolve_device, to_device
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture
from vitcc.ir.program import Program, working_copy
from vitcc.ir.selection import MIN_KEEP
from vitcc.ir.types import shape_of
from vitcc.passes.analyze import Analyze
from vitcc.passes.dce import DeadCodeElimination
from vitcc.passes.fold import Fold
from vitcc.passes.given_selection import GivenSelection
from vitcc.passes.rewrite import Rewrite
from vitcc.pipeline.manager import PassManager
from vitcc.version import __version__
from vitcc.search.latency_table import (FORMAT, branch_slots, kept_share, lanes, model_fingerprint, param_shapes,
                                        read_table, removal_lane, unit_signature, write_table)

__all__ = ["MODES", "DTYPES", "profile_table", "profile_captured", "table_for", "cache_dir", "read_table",
           "write_table", "widths_grid", "resolve_device"]

CACHE_ENV = "VITCC_CACHE"
# widths per kind in the table `--target latency` profiles when given none, in one pass (a compile waits for it;
# at 8, one pass of DeiT-S or Swin-T predicts within a median 0.9-2.3 points on a CPU; `vitcc profile -o`
# averages two passes: benchmarks/results/latency_prediction*.md)
ON_DEMAND_POINTS = 8

# the fractions every unit is also timed at with all its widths narrowed together
JOINT_FRACTIONS = (0.75, 0.5, 0.3)
# the fractions of each role's removable branches (attention, MLP) the whole model is also timed without
REMOVED_FRACTIONS = (1 / 3, 2 / 3, 1.0)


def widths_grid(n: int, kind: str, points: int = 16) -> list[int]:
    """Kept widths a unit is timed at: the dense width down to a quarter, in steps of 16 for widths of 64 and
    more (GEMM tiles; coarser where that would exceed `points`), every head count, then the minimum."""
    lo = max(MIN_KEEP.get(kind, 1), math.ceil(n / 4))
    if kind == "heads":
        step = 1
    else:
        base = 16 if n >= 64 else max(1, n // 8)
        step = base * max(1, math.ceil((n - lo) / max(1, points - 1) / base))
    out = list(range(n, lo - 1, -step))[:points]
    if out[-1] > MIN_KEEP.get(kind, 1):
        out.append(MIN_KEEP.get(kind, 1))
    return out


def extract(gm: fx.GraphModule, nodes: Sequence[str], output: str) -> tuple[fx.GraphModule, list[str]]:
    """The named nodes as a GraphModule of their own; every value they read from outside is a placeholder."""
    names = set(nodes)
    inside = [n for n in gm.graph.nodes if n.name in names]
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs: list[str] = []
    for n in inside:
        for a in n.all_input_nodes:
            if a.name not in names and a.name not in env and a.op != "get_attr":
                env[a.name] = g.placeholder(a.name)
                inputs.append(a.name)
    for n in inside:
        for a in n.all_input_nodes:
            if a.name not in env and a.op == "get_attr":
                env[a.name] = g.get_attr(a.target)
        env[n.name] = g.node_copy(n, lambda x: env[x.name])
    g.output(env[output])
    return fx.GraphModule(gm, g), inputs


def _values(gm: fx.GraphModule, example: tuple, want: set[str]) -> dict[str, Any]:
    got: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in want:
                got[n.name] = v
            return v
    with torch.no_grad():
        Recorder(gm).run(*example)
    return got


def _unit_shapes(gm: fx.GraphModule, nodes: dict[str, fx.Node], branch) -> tuple:
    """The shapes a residual branch has in `gm` (`nodes`: its nodes by name): of its values (as recorded) and its
    parameters."""
    return tuple(shape_of(nodes[name]) for name in branch.nodes if name in nodes), param_shapes(gm, branch)


def _to(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return x


class Timer:
    """Times modules on one device, dtype and mode: CUDA events on a GPU, the CPU clock on a CPU
    (vitcc.deploy.timing). `against` gives times relative to a reference timed right beside them in every round
    (a machine that slows down for a while slows all, so their ratios hold), and the reference's median ms."""

    def __init__(self, device: torch.device, dtype: torch.dtype, mode: str, samples: int = 7):
        self.device, self.dtype, self.mode, self.samples = device, dtype, mode, samples

    def runner(self, module: torch.nn.Module, inputs: Sequence[Any]) -> Callable[[], Any]:
        """`module` on `inputs` as `vitcc bench` runs it (moved, cast in a copy, compiled or captured here)."""
        module = to_device(module, self.device).eval()  # cast to dtype in a copy (make_runner): `module` stays fp32
        args = tuple(_to(x, self.device, torch.float32) for x in inputs)
        with torch.inference_mode():
            return make_runner(module, args, self.mode, self.dtype, device=self.device)

    def ratio(self, run: Callable[[], Any], ref: Callable[[], Any]) -> float:
        return self.against([run], ref)[0][0]

    def against(self, runs: Sequence[Callable[[], Any]], ref: Callable[[], Any]) -> tuple[list[float], float]:
        """Each of `runs` as a ratio to `ref`, all timed in every round, and `ref`'s own median ms.

        Every sample asked for, however long: the time budget of per-op timing would cut a whole model of
        0.5-1 s (DeiT-S at batch 8 on a CPU) to 3 samples, and the rest is a difference of whole-model times
        (DeiT-S, batch 8, 3 samples: the search's 50% selection predicted within 0.6 points by one table and
        6.1 by the next)."""
        if self.device.type == "cuda":
            return ratios_to_reference(self._cuda([*runs, ref]))
        return time_ratios(runs, ref, samples=self.samples, clock=self._clock(), budget_ms=None)

    def _clock(self) -> str:
        return "thread" if cpu_clock_ok() else "wall"

    def _cuda(self, runs: list[Callable[[], Any]]) -> list[list[float]]:
        """ms per call of each run, a sample each round (of >= ~1 ms: short runs looped), the runs in reverse
        order every other round. Events and synchronisation on `self.device`, whichever GPU is current."""
        with torch.cuda.device(self.device):
            return self._cuda_on_device(runs)

    def _cuda_on_device(self, runs: list[Callable[[], Any]]) -> list[list[float]]:
        inner = []
        for run in runs:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            inner.append(max(1, min(200, int(1e-3 / max(time.perf_counter() - t0, 1e-6)))))
        samples: list[list[float]] = [[] for _ in runs]
        for i in range(self.samples):
            order = list(range(len(runs))) if i % 2 == 0 else list(reversed(range(len(runs))))
            for k in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner[k]):
                    runs[k]()
                end.record()
                end.synchronize()
                samples[k].append(start.elapsed_time(end) / inner[k])
        return samples


def _measured(device: torch.device, dtype: str, batch: int, mode: str, threads: int | None, model_spec: str,
              fp: dict) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "allocator": heap_policy(device), "subnormals": subnormal_policy(device),
            "dtype": dtype, "batch": batch, "mode": mode, "threads": int(threads or torch.get_num_threads()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "vitcc": __version__, "model": model_spec, **fp}


def profile_table(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, device: str | torch.device = "cpu",
                  dtype: str = "fp32", batch: int | None = None, mode: str = "eager", threads: int | None = None,
                  model_spec: str = "", points: int = 16, samples: int = 7, repeats: int = 1,
                  on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the latency table of `model` on `device` in `mode` at `dtype` and `batch` (default: the example's
    batch; the example is repeated or cut to it). `points`: the most widths timed per kind; `repeats`: passes
    over the grid, averaged (`_averaged`)."""
    settings = dict(device=device, dtype=dtype, batch=batch, mode=mode, threads=threads, model_spec=model_spec,
                    points=points, samples=samples, repeats=repeats, on_progress=on_progress)
    _check(**settings)  # before the capture: a bad option costs nothing
    example = _at_batch(tuple(example_inputs), batch)
    return profile_captured(capture(model.eval(), example), example, **settings)


def profile_captured(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                     device: str | torch.device = "cpu", dtype: str = "fp32", batch: int | None = None,
                     mode: str = "eager", threads: int | None = None, model_spec: str = "", points: int = 16,
                     samples: int = 7, repeats: int = 1, on_progress: Callable[[str], None] | None = None
                     ) -> dict[str, Any]:
    """`profile_table` of a graph vitcc captured already (`vitcc.compile` profiles the graph it compiles). The
    graph is narrowed, run and timed on `device`: where it is elsewhere, a copy moves there."""
    dev = _check(device, dtype, batch, mode, repeats)
    example = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in _at_batch(tuple(example_inputs), batch))
    if device_of(gm) != dev:
        gm = moved_copy(gm, dev)
    started = time.perf_counter()
    with timing_on(dev, threads):
        table = _averaged([_profile(gm, example, dev, dtype, mode, points, samples, on_progress or (lambda m: None),
                                    (i, repeats)) for i in range(repeats)])
    table["measured"] = {**_measured(dev, dtype, int(example[0].shape[0]), mode, threads, model_spec,
                                     model_fingerprint(gm, example)), "repeats": repeats}
    table["seconds"] = round(time.perf_counter() - started, 2)
    return table


def cache_dir() -> Path:
    """Where tables profiled on demand are kept: ``$VITCC_CACHE/tables`` (default ``~/.cache/vitcc``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vitcc")
    return Path(root) / "tables"


def table_for(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *, device: str | torch.device = "cpu",
              threads: int | None = None, announce: Callable[[str], None] | None = None,
              on_progress: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """The table `--target latency` selects against when given none: measured on `device` now (eager, fp32, the
    example's batch, `threads` intra-op threads), or read from the cache, where the same graph and input shape
    measured on the same device, torch, thread count, allocator and subnormal handling left it. The cache only
    saves time: a table that is missing, foreign or unreadable is measured again. `announce` hears one line
    before a measurement, `on_progress` each of its steps (as `profile_table`'s does). Returns (table, where it
    came from)."""
    dev = resolve_device(device)
    example = tuple(example_inputs)
    fp = model_fingerprint(gm, example)
    n = int(threads or torch.get_num_threads())
    identity = {**fp, "batch": int(example[0].shape[0]), "device": str(dev), "points": ON_DEMAND_POINTS,
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "threads": n,
                "allocator": heap_policy(dev), "subnormals": subnormal_policy(dev), "vitcc": __version__,
                "format": FORMAT}
    path = cache_dir() / f"{hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}.json"
    how = f"eager, fp32, batch {identity['batch']}" + (f", {n} thread(s)" if dev.type == "cpu" else "")
    try:
        table = read_table(path)
        if table.get("cache_identity") == identity:
            return table, f"profiled on {dev} ({how}), from the cache {path}"
    except VitccError:
        pass
    if announce is not None:
        announce(f"profiling a latency table on {dev} ({how}, {ON_DEMAND_POINTS} widths per kind), once: it is "
                 f"kept in {path}")
    table = profile_captured(gm, example, device=dev, threads=threads, points=ON_DEMAND_POINTS,
                             model_spec="the model compiled", on_progress=on_progress)
    table["cache_identity"] = identity
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(table, path)
    except OSError:  # a read-only home: the table serves this compile, the next one measures again
        return table, f"profiled on {dev} now ({how}), not cached: {path.parent} is not writable"
    return table, f"profiled on {dev} now ({how}), cached in {path}"


def _check(device, dtype: str, batch: int | None, mode: str, repeats: int = 1, **_) -> torch.device:
    if mode not in MODES:
        raise VitccError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise VitccError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    dev = resolve_device(device)
    if mode == "cudagraph" and dev.type != "cuda":
        raise VitccError("--mode cudagraph needs a CUDA device (--device cuda)")
    if batch is not None and batch < 1:
        raise VitccError(f"batch must be >= 1, got {batch}")
    if repeats < 1:
        raise VitccError(f"repeats must be >= 1, got {repeats}")
    return dev


def _at_batch(example: tuple, batch: int | None) -> tuple:
    return example if batch is None or batch == example[0].shape[0] else with_batch(example, batch)


def _collect_dead_graphs(device: torch.device) -> None:
    """Frees the grid points timed before, where they hold half the GPU: a graph module and its graph refer to
    each other, so only the cycle collector frees one, with its weights (ViT-B's grid holds ~10 GB until it
    runs). Not at every point: a collection takes ~0.2 s."""
    if device.type == "cuda" and 2 * torch.cuda.memory_allocated(device) > torch.cuda.get_device_properties(
            device).total_memory:
        gc.collect()
        torch.cuda.empty_cache()


def narrowed(gm: fx.GraphModule, example_inputs: tuple, keep: dict[str, Sequence[int]]) -> fx.GraphModule:
    """The compact graph at an explicit selection, rewritten as a compile rewrites it (verify aside: a grid point
    is timed, never shipped). `gm` is left as it is."""
    _collect_dead_graphs(device_of(gm))
    work, shared = working_copy(gm)
    program = Program(gm=work, example_inputs=example_inputs, original=gm, shared=shared)
    passes = [Analyze(), GivenSelection(keep), Rewrite(), Fold(), DeadCodeElimination()]  # the built-ins: a
    # registry (make_pass) would read the entry points again at every grid point
    return PassManager(passes).run(program).gm


def _counted(progress: Callable[[str], None], total: int, done: int = 0) -> Callable[[str], None]:
    """`progress` with each step's place among `total` (`done` of them before: passes before this one) and, from
    this call's second step on, the time left at its pace so far (a table takes minutes; a torch.compile table of
    Swin-T on a CPU, over half an hour)."""
    start, k = time.perf_counter(), done

    def step(what: str) -> None:
        nonlocal k
        k += 1
        left = (time.perf_counter() - start) / (k - done - 1) * (total - k + 1) if k > done + 1 else None
        progress(f"{what} ({k}/{total}" + (f", ~{_duration(left)} left)" if left is not None else ")"))
    return step


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _grids(groups: list, points_per_kind: int) -> dict[str, list[int]]:
    return {g.name: widths_grid(g.size, g.kind, points_per_kind) for g in groups}


def _removal_counts(n: int) -> list[int]:
    """How many of a role's `n` removable branches each removal point removes."""
    return sorted({max(1, round(n * f)) for f in REMOVED_FRACTIONS}) if n else []


def _steps_in(lane_groups: dict[str, list], branches: list, points_per_kind: int) -> int:
    """The steps `_profile` reports: the dense model, each lane's grid points, the joint points, the removals."""
    lane_points = sum(max(map(len, _grids(gs, points_per_kind).values())) - 1 for gs in lane_groups.values())
    removals = sum(len(_removal_counts(sum(b.prunable for b in branches if b.role == role)))
                   for role in dict.fromkeys(b.role for b in branches))
    return 1 + lane_points + (len(JOINT_FRACTIONS) if lane_groups else 0) + removals


def _profile(gm, example, dev, dtype, mode, points_per_kind, samples, progress, repeat=(0, 1)) -> dict[str, Any]:
    """One pass over the grid (`repeat`: its index and the number of passes)."""
    program = Program(gm=gm, example_inputs=example, original=gm)
    Analyze().run(program)
    timer = Timer(dev, DTYPES[dtype], mode, samples)
    branches = program.branches
    sig = {b.name: unit_signature(program, b) for b in branches}
    reps = {}
    for b in branches:
        reps.setdefault(sig[b.name], b)
    slots = {s: branch_slots(program, b) for s, b in reps.items()}
    dense_nodes = {n.name: n for n in gm.graph.nodes}
    dense_shapes = {s: _unit_shapes(gm, dense_nodes, b) for s, b in reps.items()}

    def runners(compact: fx.GraphModule, whole: bool = True, changed_only: bool = True
                ) -> tuple[Callable[[], Any] | None, dict[str, Callable[[], Any]]]:
        """The whole model (with `whole`) and each unit (by signature) as `compact` has them, ready to time. With
        `changed_only`, a unit that keeps every dense shape is left out: it is the dense unit (ratio 1), and
        compiling and timing it again would cost a torch.compile and add only noise (a lane narrows one kind:
        Swin-T's head lanes leave its 5 MLP units as they are)."""
        have = {n.name: n for n in compact.graph.nodes}
        cut = {}
        for s, b in reps.items():
            if b.output in have and not (changed_only and _unit_shapes(compact, have, b) == dense_shapes[s]):
                cut[s] = extract(compact, [n for n in b.nodes if n in have], b.output)
        vals = _values(compact, example, {i for _, ins in cut.values() for i in ins}) if cut else {}
        return (timer.runner(compact, example) if whole else None), {
            s: timer.runner(sub, [vals[i] for i in ins]) for s, (sub, ins) in cut.items()}

    dense_whole, dense_units = runners(gm, changed_only=False)

    def dense_ms() -> tuple[float, dict[str, float]]:
        """ms of the dense whole model, and of each dense unit as a ratio to the whole timed beside it: what a
        unit saves is read against the whole, so their shares must be measured at one speed of the machine
        (DeiT-S at batch 8 on a shared CPU: one MLP unit timed alone at 22.5 and 26.3 ms a minute apart)."""
        shares, whole = timer.against(list(dense_units.values()), dense_whole)  # one whole serves every unit
        return whole, {s: whole * r for s, r in zip(dense_units, shares)}

    def ratios(compact: fx.GraphModule, whole: bool = True) -> tuple[float | None, dict[str, float]]:
        """`compact`'s whole model (with `whole`) and the units it changed, each as a ratio to its dense self timed
        right beside it."""
        run, units = runners(compact, whole)
        return (timer.ratio(run, dense_whole) if run is not None else None,
                {s: timer.ratio(r, dense_units[s]) for s, r in units.items()})

    def total(units: dict[str, float], removed: frozenset = frozenset()) -> float:
        return sum(units.get(sig[b.name], 0.0) for b in branches if b.name not in removed)
    lane_of = lanes(program)
    lane_groups = {lane: [g for g in program.groups if g.prunable and lane_of[g.name] == lane]
                   for lane in sorted({lane_of[g.name] for g in program.groups if g.prunable})}
    steps = _steps_in(lane_groups, branches, points_per_kind)
    progress = _counted(progress, steps * repeat[1], steps * repeat[0])
    progress("dense model")
    dense_ms()  # warm-up: the first runs of a process are slower
    dense: list[tuple[float, dict[str, float]]] = []
    points: dict[str, dict[str, list]] = {s: {slot: [] for slot in slots[s]} for s in reps}
    lane_ratios: dict[str, list] = {}  # lane -> [kept fraction, whole's ratio, units' ratios] per grid point
    for lane in list(lane_groups) or [None]:
        whole, units = dense_ms()  # each lane's own dense point, which its unit points are scaled by
        dense.append((whole, units))
        if lane is None:
            break
        groups = lane_groups[lane]
        grids = _grids(groups, points_per_kind)
        size = sum(g.size for g in groups)
        lane_ratios[lane] = []
        first = {s: next((k for k, g in slots[s].items() if g in grids), None) for s in reps}
        for s, ms in units.items():  # the unit's first group in this lane holds its points (tied ones: one)
            if first[s] is not None:
                points[s][first[s]].append([program.group(slots[s][first[s]]).size, ms])
        n = max(len(v) for v in grids.values())
        for j in range(1, n):
            keep = {name: range(v[min(j, len(v) - 1)]) for name, v in grids.items()}
            progress(f"{lane} {j}/{n - 1}")
            try:
                compact = narrowed(gm, example, keep)
            except VitccError:  # a width the graph's constraints refuse: not a point
                continue
            whole_r, units_r = ratios(compact)
            for s, r in units_r.items():
                if first[s] is not None:
                    points[s][first[s]].append([len(keep[slots[s][first[s]]]), r * units[s]])
            lane_ratios[lane].append([sum(len(keep[g.name]) for g in groups) / size, whole_r, units_r])
    joint = (_joint_points(program, gm, example, slots, dense_ms, ratios, points_per_kind, progress)
             if lane_groups else {})
    removals = _removal_points(gm, example, branches, lambda c: timer.ratio(timer.runner(c, example), dense_whole),
                               progress)
    whole = statistics.median(d[0] for d in dense)
    unit_ms = {s: statistics.median(d[1][s] for d in dense if s in d[1]) for s in reps if s in dense[0][1]}

    def rest_at(whole_ratio: float, unit_ratios: dict[str, float], removed: frozenset = frozenset()) -> float:
        """What the units do not hold, from ratios on one dense scale (the medians): a lane's own dense timings
        are a few % off on a busy machine, and that error would land in the rest as a saving of the lane's kind."""
        return whole * whole_ratio - total({s: ms * unit_ratios.get(s, 1.0) for s, ms in unit_ms.items()}, removed)
    rest = {lane: [[1.0, rest_at(1.0, {})]] + [[frac, rest_at(r, us)] for frac, r, us in pts]
            for lane, pts in lane_ratios.items()}
    for role, pts in removals.items():
        of_role = {b.name: unit_ms.get(sig[b.name], 0.0) for b in branches if b.role == role}
        rest[removal_lane(role)] = [[1.0, rest_at(1.0, {})]] + [
            [kept_share(of_role, gone), rest_at(r, {}, frozenset(gone))] for gone, r in pts]
    return {"format": FORMAT, "dense_ms": whole, "rest_ms": whole - total(unit_ms), "branches": sig,
            "units": {s: {"role": reps[s].role, "dense_ms": ms, "slots": points[s],
                          "widths": {slot: program.group(g).size for slot, g in slots[s].items()},
                          **({"joint": joint[s]} if joint.get(s) else {})}
                      for s, ms in unit_ms.items()},
            "rest": rest}


def _averaged(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """Passes over one grid, one after another, averaged point by point. A shared machine's slow spells outlast
    a point but not a pass, so a pass's errors move together and two passes' do not: DeiT-S at batch 1 on the
    2-core CPU, five tables replayed against the same four runs' measured selections (`benchmarks/
    latency_prediction.py --replay --table`): one pass each, a mean median error of 0.7-1.4 points and a worst of
    3.1-6.5; any two averaged, 0.5-1.1 and 2.8-4.8. One pass with twice the samples did not help (0.9-1.0, worst
    3.3-4.7). Per unit slot the ratios to its dense width are averaged, which is all a prediction reads of them
    (`unit_time`)."""
    if len(tables) == 1:
        return tables[0]
    out = copy.deepcopy(tables[0])
    mean = statistics.fmean
    for key in ("dense_ms", "rest_ms"):
        out[key] = mean(t[key] for t in tables)
    for s, unit in out["units"].items():
        passes = [t["units"][s] for t in tables]
        unit["dense_ms"] = mean(u["dense_ms"] for u in passes)
        for slot, pts in unit["slots"].items():
            curves = [u["slots"][slot] for u in passes]
            at_dense = [next((ms for w, ms in c if w == unit["widths"][slot]), 0.0) for c in curves]
            if _same_grid(curves, pts) and all(at_dense):
                for i, p in enumerate(pts):
                    p[1] = unit["dense_ms"] * mean(c[i][1] / d for c, d in zip(curves, at_dense))
        joints = [u.get("joint", []) for u in passes]
        if _same_grid(joints, unit.get("joint", [])):
            for i, p in enumerate(unit.get("joint", [])):
                p[1], p[2] = unit["dense_ms"] * mean(j[i][1] / j[i][2] for j in joints), unit["dense_ms"]
    for lane, pts in out["rest"].items():
        lines = [t["rest"].get(lane, []) for t in tables]
        if all(len(line) == len(pts) for line in lines):  # (a removal lane's fractions differ a little: averaged)
            for i, p in enumerate(pts):
                p[0], p[1] = mean(line[i][0] for line in lines), mean(line[i][1] for line in lines)
    return out


def _same_grid(lists: list[list], first: list) -> bool:
    """The passes timed the same widths (a width the graph refuses is refused in every pass)."""
    return all(len(x) == len(first) and all(a[0] == b[0] for a, b in zip(x, first)) for x in lists)


def _removal_points(gm, example, branches, whole_ratio, progress) -> dict[str, list]:
    """The whole model without a third, two thirds and all of the removable branches of one role (attention, MLP):
    a branch costs more inside the model than its unit timed alone (its weights and activations leave the caches;
    DeiT-S at batch 8 on a CPU, the search removed every attention branch: measured 6 points more saving than
    the units said), and the rest's line in that role's lane (`removal_lane`) holds the difference. Role ->
    [the branches removed, the whole's ratio to dense] per point."""
    out: dict[str, list] = {}
    for role in dict.fromkeys(b.role for b in branches):
        removable = [b.name for b in branches if b.role == role and b.prunable]
        n = len(removable)
        for c in _removal_counts(n):
            gone = [removable[i * n // c] for i in range(c)]  # spread along the model
            progress(f"{removal_lane(role)} {c}/{n} removed")
            try:
                compact = narrowed(gm, example, {name: [] for name in gone})
            except VitccError:
                continue
            out.setdefault(role, []).append([gone, whole_ratio(compact)])
    return out


def _joint_points(program, gm, example, slots, dense_ms, ratios, points_per_kind, progress) -> dict[str, list]:
    """Every unit with all its widths narrowed at once, at a few fractions: what one-width-at-a-time sweeps
    cannot show, how the savings of its widths combine (vitcc.search.latency_table fits a unit's floor on
    them). Each point: [{slot: width}, ms, the unit's dense ms timed just before]."""
    groups = [g for g in program.groups if g.prunable]
    grids = _grids(groups, points_per_kind)
    dense = dense_ms()
    out: dict[str, list] = {s: [] for s in slots}
    for i, frac in enumerate(JOINT_FRACTIONS):
        keep = {g.name: range(min(grids[g.name], key=lambda w: abs(w - frac * g.size))) for g in groups}
        progress(f"all widths {i + 1}/{len(JOINT_FRACTIONS)}")
        try:
            compact = narrowed(gm, example, keep)
        except VitccError:
            continue
        _, units = ratios(compact, whole=False)  # the whole's joint ratio is not used
        for s, r in units.items():
            widths = {slot: len(keep[g]) if g in keep else program.group(g).size for slot, g in slots[s].items()}
            out[s].append([widths, r * dense[1][s], dense[1][s]])
    return out
