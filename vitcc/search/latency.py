"""Latency: interleaved timing, and a per-op latency model measured on this machine (``--target latency``).

The model predicts the eager PyTorch latency of a compact model from its kept widths, without building
it. Every compute op of the traced graph (linear, conv, attention, matmul, layer norm, softmax,
elementwise activations and arithmetic) is timed on its own at the shape the selection gives it, as a
ratio to the same op at its dense shape timed right beside it, and the dense op as a ratio to a
reference GEMM (so a shared machine's ups and downs cancel); with one intra-op thread, in the
thread's CPU time (so time spent waiting for a core does not count). What
is not timed op by op (views, reshapes, indexing, Python dispatch) is one constant, calibrated once
per model as the measured latency of the whole dense model minus the sum of its timed ops.

Timings are cached in ``$VITCC_CACHE/latency/<key>.json`` (default ``~/.cache/vitcc``), one entry per
op and shapes; the key hashes the CPU model, CPU count, torch version, thread count, dtype and how freed
memory is treated (vitcc.deploy.timing.steady_heap), and the file repeats them, so a cache never answers
for another machine or setting. Ops are timed at the thread count the model will run with (``threads=``,
``--threads``): a GEMM split over two threads does not shrink with its width as it does on one, so each
count has its own cache. ``vitcc profile`` fills it ahead of time; ``select`` (``target="latency"``,
:class:`LatencyCost`) measures what is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

from vitcc.deploy.timing import cpu_clock_ok, heap_policy, time_fn, time_ratio, timing_on
from vitcc.ir.shapes import CompactShapes
from vitcc.ir.program import Program
from vitcc.analysis.ops._timing import TimedOp
from vitcc.search.cost import CostModel

__all__ = ["cache_dir", "machine_info", "machine_key", "LatencyTable", "LatencyModel", "LatencyCost", "compact_ops"]

CACHE_ENV = "VITCC_CACHE"
FORMAT = 4
# how many steps past the uniform fraction the latency search tries each kind (selection.search_budget)
LATENCY_FURTHER_STEPS = 2


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vitcc")
    return Path(root) / "latency"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def machine_info(threads: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """What a latency measurement depends on; its hash names the cache file."""
    return {"cpu": _cpu_model(), "arch": platform.machine(), "ncpu": _ncpu(), "torch": torch.__version__,
            "threads": int(threads or torch.get_num_threads()), "dtype": str(dtype).replace("torch.", ""),
            "allocator": heap_policy(), "format": FORMAT}


def machine_key(info: dict) -> str:
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


class LatencyTable:
    """Op key -> median milliseconds, for one machine key; a JSON file under :func:`cache_dir`."""

    def __init__(self, info: dict | None = None, path: str | Path | None = None):
        self.info = info or machine_info()
        self.path = Path(path) if path is not None else cache_dir() / f"{machine_key(self.info)}.json"
        self.entries: dict[str, float] = {}
        self.dirty = False
        self.measured = 0  # ops timed by this process

    @classmethod
    def load(cls, info: dict | None = None, path: str | Path | None = None) -> "LatencyTable":
        table = cls(info, path)
        table.entries.update(_read(table.path, table.info))
        return table

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def set(self, key: str, ms: float) -> None:
        self.entries[key] = float(ms)
        self.dirty = True

    def save(self) -> Path:
        """Merge with what is on disk (another process may have added entries) and replace atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(self.path, self.info), **self.entries}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"info": self.info, "entries": merged}, indent=0, sort_keys=True))
            tmp.replace(self.path)
        finally:  # interrupted mid-write: no partial file stays behind
            tmp.unlink(missing_ok=True)
        self.entries = merged
        self.dirty = False
        return self.path


def _read(path: Path, info: dict) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("info") != info or not isinstance(data.get("entries"), dict):
        return {}  # another machine/setting hashed to this name, or a foreign file: ignore it
    return {str(k): float(v) for k, v in data["entries"].items() if isinstance(v, (int, float))}


# -------------------------------------------------------------------------------------- op extraction

def compact_ops(program: Program, keep: dict) -> list[TimedOp]:
    """The timed ops of the compact model that the selection ``keep`` (root id -> indices) would give: each
    node's op table `latency` entry at the compact shapes (and at the dense ones, for the ratio)."""
    gm = program.gm
    sh, dense = CompactShapes(program, keep), (CompactShapes(program, {}) if keep else None)
    gone = program.removed_nodes(keep)  # the ops of removed branches
    ops: list[TimedOp] = []
    for node in gm.graph.nodes:
        info = program.ops.get(node.target) if node.op == "call_function" else None
        if info is None or info.latency is None or node.name in gone:
            continue
        out = sh.node(node)
        if out is not None and 0 in out:
            continue  # a branch with no channels left: folded away
        try:
            op = info.latency(node, sh)
            if op is not None and dense is not None:
                d = info.latency(node, dense)
                op.dense = d if d is not None and d.key != op.key else None
        except Exception:  # an op shape vitcc cannot reproduce: part of the constant remainder
            op = None
        if op is not None:
            ops.append(op)
    return ops


# ------------------------------------------------------------------------------------------- model

def fingerprint(gm: fx.GraphModule, example_inputs: tuple) -> str:
    h = hashlib.sha1(gm.code.encode())
    for name, p in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
    for x in example_inputs:
        h.update(f"in:{tuple(getattr(x, 'shape', ()))}:{getattr(x, 'dtype', '')}".encode())
    return h.hexdigest()[:16]


REF_KEY = "ref|linear|197x256|256|0"
DISPATCH_KEY = "dispatch|view"


def _reference() -> Callable[[], Any]:
    """The kernel every timing is taken relative to: a ViT-S-sized GEMM (a fraction of a millisecond)."""
    x, w = torch.randn(197, 256), torch.randn(256, 256)
    return lambda: F.linear(x, w)


class LatencyModel:
    """Predicted eager latency (ms) of the compact model for a selection of ``program``'s groups.

    Every op is timed relative to a reference GEMM measured right beside it, and stored as that ratio
    times the reference's own time when the cache was first filled, so entries measured at different
    moments of a shared machine's day stay on one scale.
    """

    def __init__(self, program: Program, table: LatencyTable | None = None, *, samples: int = 7):
        self.program = program
        self.table = table if table is not None else LatencyTable.load()
        self.samples = samples
        self.clock = "thread" if cpu_clock_ok(self.table.info["threads"]) else "wall"
        self._ref = None
        self._dense_ops: float | None = None
        self._overhead: float | None = None

    @property
    def ref_ms(self) -> float:
        ms = self.table.get(REF_KEY)
        if ms is None:
            ms = time_fn(_reference(), samples=max(self.samples, 9), clock=self.clock)
            self.table.set(REF_KEY, ms)
        return ms

    def _timed(self, fn: Callable[[], Any], **kw) -> float:
        if self._ref is None:
            self._ref = _reference()
        return time_ratio(fn, self._ref, clock=self.clock, **kw) * self.ref_ms

    def op_ms(self, op: TimedOp) -> float:
        """An op at its dense shape: timed against the reference GEMM. At a compact shape: timed against
        the same op at its dense shape, right beside it (ops of one kind and size slow down alike when
        the machine is busy, so their ratio is steadier than either time), times the dense op's time."""
        if op.dense is None:
            return self._absolute_ms(op)
        key = f"rel|{op.key}|{op.dense.key}"
        r = self.table.get(key)
        if r is None:
            try:
                fn, ref = op.make(), op.dense.make()
                r = time_ratio(fn, ref, samples=self.samples, clock=self.clock)
                del fn, ref
            except Exception:  # an op vitcc cannot rebuild on its own: left to the calibrated constant
                r = 0.0
            self.table.set(key, r)
            self.table.measured += 1
        return r * self._absolute_ms(op.dense)

    def _absolute_ms(self, op: TimedOp) -> float:
        ms = self.table.get(op.key)
        if ms is None:
            try:
                fn = op.make()
                ms = self._timed(fn, samples=self.samples)
                del fn
            except Exception:  # an op vitcc cannot rebuild on its own: left to the calibrated constant
                ms = 0.0
            self.table.set(op.key, ms)
            self.table.measured += 1
        return ms

    def ops_ms(self, keep: dict) -> float:
        return float(sum(self.op_ms(op) for op in compact_ops(self.program, keep)))

    def breakdown(self, keep: dict) -> dict[str, float]:
        """Milliseconds per op kind (linear, sdpa, layer_norm, ...)."""
        out: dict[str, float] = {}
        for op in compact_ops(self.program, keep):
            kind = op.key.split("|", 1)[0]
            if kind == "ew":
                kind = op.key.split("|", 2)[1].replace("module:", "").replace("method:", "")
            out[kind] = out.get(kind, 0.0) + self.op_ms(op)
        return out

    def dense_measured_ms(self) -> float:
        """Whole dense model, median of several runs; cached per graph fingerprint and input shapes."""
        p = self.program
        key = f"model|{fingerprint(p.gm, p.example_inputs)}"
        ms = self.table.get(key)
        if ms is None:
            gm = p.original if p.original is not None else p.gm
            gm.eval()
            ms = self._timed(lambda: gm(*p.example_inputs), samples=9, min_sample_ms=0.0, budget_ms=4000.0)
            self.table.set(key, ms)
        return ms

    @property
    def overhead_ms(self) -> float:
        """Latency of what is not timed op by op (views, indexing, Python): assumed not to shrink.

        The dense model's measured latency minus its timed ops; at least one Python-level tensor call
        per untimed node (ops timed alone can add up to more than the model when the machine is busy)."""
        if self._overhead is None:
            self._dense_ops = self.ops_ms({})
            untimed = sum(1 for n in self.program.gm.graph.nodes
                          if n.op in ("call_module", "call_function", "call_method")) - len(compact_ops(self.program, {}))
            floor = max(0, untimed) * self.dispatch_ms()
            self._overhead = max(floor, self.dense_measured_ms() - self._dense_ops)
        return self._overhead

    def dispatch_ms(self) -> float:
        """One cheap tensor call from Python (a view), the floor of what an untimed node costs."""
        ms = self.table.get(DISPATCH_KEY)
        if ms is None:
            x = torch.zeros(4, 4)
            ms = time_fn(lambda: x.view(16), samples=9, clock=self.clock)
            self.table.set(DISPATCH_KEY, ms)
        return ms

    def predict(self, keep: dict) -> float:
        """Timed ops plus the untimed remainder; removed branches take their share of that remainder (their
        views and indexing go too: per untimed node)."""
        overhead = self.overhead_ms
        gone = self.program.removed_nodes(keep)
        if gone:
            untimed = self._untimed()
            overhead *= 1 - len(untimed & gone) / max(1, len(untimed))
        return self.ops_ms(keep) + overhead

    def _untimed(self) -> set[str]:
        timed = {n.name for n in self.program.gm.graph.nodes if n.op == "call_function"
                 and (info := self.program.ops.get(n.target)) is not None and info.latency is not None}
        return {n.name for n in self.program.gm.graph.nodes
                if n.op in ("call_module", "call_function", "call_method") and n.name not in timed}

    def save(self) -> Path | None:
        return self.table.save() if self.table.dirty else None


# ------------------------------------------------------------------------------- --target latency

class LatencyCost(CostModel):
    """The predicted latency as the budget search's cost model (``--target latency``). Ops are timed at the
    thread count the model will run with, ``program.options["threads"]`` (default: torch's), from that
    count's cache; what was measured is saved when the search ends."""
    what = "latency"
    further_steps = LATENCY_FURTHER_STEPS

    def __init__(self, program: Program):
        self.program = program
        self.threads = program.options.get("threads")
        self.model: LatencyModel | None = None

    @contextmanager
    def measuring(self) -> Iterator[None]:
        with timing_on("cpu", self.threads):
            self.model = LatencyModel(self.program)
            try:
                yield
            finally:
                self.model.save()

    def __call__(self, keep: dict) -> float:
        return self.model.predict(keep)

    def out_of_reach(self, goal: float, most: float, kinds: set[str]) -> str:
        return (f"--target latency: removing {goal:.0%} of the latency is out of reach; pruning every group to its "
                f"minimum removes {most:.0%} (of {self.dense():.3g} ms predicted, {self.model.overhead_ms:.3g} ms do "
                "not shrink with widths)")

    def report(self, keep: dict) -> dict:
        m, p = self.model, self.program
        base, after = self.dense(), self(keep)
        return {"latency_model": {
            "predicted_ms_before": base, "predicted_ms_after": after,
            "predicted_reduction": 1 - after / base if base > 0 else 0.0, "overhead_ms": m.overhead_ms,
            "ops_measured": m.table.measured, "cache": str(m.table.path), "threads": m.table.info["threads"],
            "clock": m.clock, "input_shapes": [list(getattr(x, "shape", ())) for x in p.example_inputs]}}
