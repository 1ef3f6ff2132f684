"""Timing a model the way a deployment runs it: interleaved runs of dense and compact, per-thread CPU time
where it is trustworthy, the example inputs at another batch, onnxruntime sessions. `vitcc bench`, the
latency tables (vitcc.profiling) and benchmarks/ share these.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vitcc.errors import VitccError

__all__ = ["time_fn", "time_ratio", "time_ratios", "ratios_to_reference", "interleaved", "summarize", "loadavg",
           "cpu_clock_ok", "intra_op_threads", "steady_heap", "heap_policy", "subnormals_flushed", "flushed_subnormals",
           "flush_subnormals_in_this_process", "subnormal_policy", "timing_on", "cpu_model", "machine_info", "with_batch", "onnx_cpu_session", "onnx_session",
           "onnx_feed"]


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Unix
        return "n/a"


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` inside (None: left as it is), and restored after:
    what a latency is measured at, without changing the process for whoever called."""
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise VitccError(f"threads must be a whole number >= 1 (1 thread .. {os.cpu_count()} on this machine), "
                             f"got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# glibc's mallopt parameters (malloc.h) and the values vitcc times at and leaves behind
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_BELOW = 1 << 30  # blocks below 1 GiB come from the heap, and freed ones stay there for the next call
_GLIBC_CEILING = 32 << 20  # where glibc's own moving mmap threshold stops on 64-bit (its trim follows at twice)


@functools.lru_cache(maxsize=None)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc under another name
        return None


def _users_allocator() -> str | None:
    """The allocator settings the user chose for this process (a preloaded jemalloc or tcmalloc, glibc's own
    variables), which vitcc times with as they are."""
    env = os.environ
    chosen = [f"{k}={v}" for k, v in env.items() if k.startswith("MALLOC_") and k.endswith("_")]
    chosen += [f"{k}={env[k]}" for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if "malloc" in env.get(k, "")]
    return ", ".join(chosen) or None


def heap_policy(device: torch.device | str = "cpu") -> str:
    """How timings on `device` treat freed memory (`steady_heap` on the CPU), for the record of a measurement."""
    if torch.device(device).type == "cuda":
        return "PyTorch's CUDA caching allocator"
    users = _users_allocator()
    if users is not None:
        return f"malloc as the process sets it ({users})"
    return ("glibc malloc, freed memory kept for the next call" if _glibc() is not None
            else "the platform's malloc, as it is")


class _HeapHolders:
    """How many `steady_heap` blocks are open: malloc's settings belong to the process, so only the last one out
    restores them (a compile with `--target latency` inside a timed benchmark)."""
    lock = threading.Lock()
    count = 0


@contextlib.contextmanager
def steady_heap():
    """CPU timing as a model is served with a caching allocator (jemalloc, tcmalloc: what PyTorch's CPU tuning
    guide advises): on glibc, freed blocks stay in the heap for the next call. glibc otherwise maps every block
    above a threshold afresh and gives it back when freed, and that threshold moves with the sizes the process
    freed before: each call then pays page faults by the process's history, not by the model (DeiT-S, batch 8,
    1 thread: 56,000 page faults per forward, 10-13% of its time; a model narrowed to MLP width 1360 ran 8%
    faster than its units said, because its blocks fell below the threshold that dense had moved). After,
    malloc stands where its own heuristic ends once a large model has run (blocks below 32 MiB from the heap)
    and free memory goes back to the system. Not glibc, or an allocator the user chose (`LD_PRELOAD`, glibc's
    `MALLOC_*_` variables): nothing is changed. Yields whether it applied."""
    libc = _glibc()
    if libc is None or _users_allocator() is not None:
        yield False
        return
    with _HeapHolders.lock:
        if _HeapHolders.count == 0:  # (glibc before 2.26 takes at most 32 MiB)
            libc.mallopt(_M_MMAP_THRESHOLD, _KEPT_BELOW) or libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_CEILING)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_BELOW)
        _HeapHolders.count += 1
    try:
        yield True
    finally:
        with _HeapHolders.lock:
            _HeapHolders.count -= 1
            if _HeapHolders.count == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_CEILING)
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_CEILING)
                libc.malloc_trim(0)


def subnormals_flushed() -> bool:
    """Whether the calling thread's CPU flushes float32 subnormals to zero (x86 FTZ/DAZ): torch can set the mode
    (`torch.set_flush_denormal`) but not read it, so a subnormal is computed with and looked at."""
    return (torch.full((1,), 1e-39) * 1.0).item() == 0.0  # 1e-39: below float32's smallest normal, 1.2e-38


@contextlib.contextmanager
def flushed_subnormals():
    """CPU timing with float32 subnormals flushed to zero, as a model should be served on a CPU. A subnormal
    operand sends x86 arithmetic down a microcode path ~100x slower, and whether a model meets any depends on its
    data, not on its widths: Swin's shifted windows add -100 to the masked attention logits, and the softmax
    turns 12-43% of those probabilities subnormal (e^-100); the batched matmul with V then ran 33x slower, and
    the dense Swin-T at batch 1 on one thread took 141 ms instead of 106 (2-core Xeon). A latency table timed so
    put that into whichever widths happened to meet it (a residual narrowed to 144 saved 68% of a shifted block,
    192 saved 12%), and the search read it as a property of the widths. The mode belongs to each thread and a
    thread starts with its creator's: the calling thread's is set here and restored after; torch's intra-op
    workers keep the mode they started with, so a program timing at several threads (the `vitcc` command,
    benchmarks/) calls `flush_subnormals_in_this_process` first. Yields whether it applies (False on a CPU that
    cannot flush)."""
    with _subnormal_mode_kept() as before:
        yield before or bool(torch.set_flush_denormal(True))


def flush_subnormals_in_this_process() -> None:
    """For a program that times (the `vitcc` command, benchmarks/): subnormals flushed on this thread and on every
    thread started after, which takes its creator's mode (`flushed_subnormals`). Call it before torch starts its
    intra-op workers."""
    torch.set_flush_denormal(True)


@contextlib.contextmanager
def _subnormal_mode_kept():
    """The calling thread's subnormal mode as it was before, whatever set it inside. Yields it."""
    before = subnormals_flushed()
    try:
        yield before
    finally:
        if subnormals_flushed() != before:
            torch.set_flush_denormal(before)


def subnormal_policy(device: torch.device | str = "cpu") -> str:
    """How timings on `device` treat subnormals (`flushed_subnormals` on the CPU), for the record."""
    if torch.device(device).type == "cuda":
        return "subnormals as the GPU computes them"
    with flushed_subnormals() as flushed:
        return "subnormals flushed to zero" if flushed else "subnormals computed (this CPU cannot flush them)"


@contextlib.contextmanager
def timing_on(device: torch.device | str, threads: int | None):
    """The process as vitcc times a model on `device`: `threads` intra-op threads (None: torch's; restored after),
    and on the CPU freed memory kept (`steady_heap`; a GPU has PyTorch's caching allocator) and subnormals
    flushed (`flushed_subnormals`). Yields the count."""
    on_cpu = torch.device(device).type == "cpu"
    with intra_op_threads(threads) as n, steady_heap() if on_cpu else contextlib.nullcontext(), \
            flushed_subnormals() if on_cpu else contextlib.nullcontext():
        yield n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def machine_info(threads: int | None = None) -> dict:
    """The CPU side of what a timing depends on (`vitcc bench` records it; a GPU adds its own)."""
    return {"cpu": cpu_model(), "arch": platform.machine(), "ncpu": _cpu_count(), "torch": torch.__version__,
            "threads": int(threads or torch.get_num_threads()), "allocator": heap_policy(),
            "subnormals": subnormal_policy()}


def cpu_clock_ok(threads: int | None = None) -> bool:
    """With one intra-op thread every kernel runs on the calling thread, so its CPU time is the op's cost
    without the time the scheduler gave to other processes (the machine may be shared)."""
    return int(threads or torch.get_num_threads()) == 1


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, samples: int = 7, min_sample_ms: float = 2.0,
            budget_ms: float | None = 400.0, clock: str = "wall") -> float:
    """Median milliseconds per call of ``fn``; short ops are looped so one sample lasts ``min_sample_ms``.

    ``clock="thread"`` measures the calling thread's CPU time (see :func:`cpu_clock_ok`), ``"wall"``
    wall-clock time. Fewer samples (at least 3) are taken when ``samples`` would exceed ``budget_ms`` (None:
    no budget).
    """
    now = time.thread_time if clock == "thread" else time.perf_counter
    with torch.inference_mode():
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            once = (time.perf_counter() - t0) * 1e3
        inner = max(1, int(math.ceil(min_sample_ms / max(once, 1e-4))))
        n = samples if budget_ms is None else max(3, min(samples, int(budget_ms / max(once * inner, 1e-6))))
        out = []
        for _ in range(n):
            t0 = now()
            for _ in range(inner):
                fn()
            out.append((now() - t0) * 1e3 / inner)
    return float(statistics.median(out))


def time_ratio(fn: Callable[[], Any], ref: Callable[[], Any], **options: Any) -> float:
    """Median over paired samples of (time of ``fn``) / (time of ``ref``), the two alternating (`time_ratios`)."""
    return time_ratios([fn], ref, **options)[0][0]


def time_ratios(fns: Sequence[Callable[[], Any]], ref: Callable[[], Any], *, warmup: int = 2, samples: int = 7,
                min_sample_ms: float = 2.0, budget_ms: float | None = 600.0,
                clock: str = "wall") -> tuple[list[float], float]:
    """Each of ``fns`` as the median over rounds of (its time) / (time of ``ref`` in that round), and ``ref``'s
    median milliseconds per call. Every round times all of them, in reverse order every other round.

    A shared machine speeds up and slows down over seconds (other processes, caches, clocks); timing
    every op against a reference measured right beside it cancels most of that drift. One reference serves
    many: timing each against its own would run the reference once per function (a Swin-T latency table
    times 11 units against the whole model).
    """
    now = time.thread_time if clock == "thread" else time.perf_counter
    runs = [*fns, ref]
    with torch.inference_mode():
        once = []
        for f in runs:
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                f()
                last = (time.perf_counter() - t0) * 1e3
            once.append(last)
        inner = [max(1, int(math.ceil(min_sample_ms / max(v, 1e-4)))) for v in once]
        per = sum(o * k for o, k in zip(once, inner))
        n = samples if budget_ms is None else max(3, min(samples, int(budget_ms / max(per, 1e-6))))
        took: list[list[float]] = [[] for _ in runs]
        for i in range(n):
            for k in (range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))):
                t0 = now()
                for _ in range(inner[k]):
                    runs[k]()
                took[k].append((now() - t0) * 1e3 / inner[k])
    return ratios_to_reference(took)


def ratios_to_reference(samples: Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """Per-round times of several runs, the reference's last: each run's median ratio to the reference in the
    same round, and the reference's median time."""
    ref = samples[-1]
    return ([float(statistics.median(a / max(b, 1e-12) for a, b in zip(t, ref))) for t in samples[:-1]],
            float(statistics.median(ref)))


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 10, warmup: int = 2,
                on_round: Callable[[int], None] | None = None,
                device: torch.device | None = None) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per call of every function, one call of each per round, in a rotating order.

    Dense and compact models timed this way share whatever else the machine is doing: compare them
    within one call, never across calls. Returns ``{name: {"wall": [...], "cpu": [...]}}`` (process CPU
    time, which excludes time the process waited for a core); take medians. On a CUDA ``device`` the
    calls are timed with CUDA events on its stream (``{"wall": [...]}``, no CPU time: the host only
    launches work), from the start of one call's kernels to the end of its last.
    """
    if device is not None and torch.device(device).type == "cuda":
        return _interleaved_cuda(fns, rounds, warmup, on_round, torch.device(device))
    names = list(fns)
    out = {n: {"wall": [], "cpu": []} for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[n]()
                t1, c1 = time.perf_counter(), time.process_time()
                out[n]["wall"].append((t1 - t0) * 1e3)
                out[n]["cpu"].append((c1 - c0) * 1e3)
            if on_round is not None:
                on_round(r)
    return out


def _interleaved_cuda(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                      on_round: Callable[[int], None] | None, device: torch.device) -> dict[str, dict[str, list[float]]]:
    names = list(fns)
    out: dict[str, dict[str, list[float]]] = {n: {"wall": []} for n in names}
    with torch.cuda.device(device), torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        torch.cuda.synchronize(device)
        for r in range(rounds):
            k = r % len(names)
            events = []
            fns[names[k - 1]]()  # untimed: the first timed call of a round starts behind work, as the others do
            for n in names[k:] + names[:k]:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events.append((n, start, end))
            torch.cuda.synchronize(device)  # once per round: the calls run back to back, as they would serve
            for n, start, end in events:
                out[n]["wall"].append(start.elapsed_time(end))
            if on_round is not None:
                on_round(r)
    return out


# -------------------------------------------------------------------------------------------- cache

def with_batch(example_inputs: tuple, batch: int, seed: int = 0) -> tuple:
    """The example inputs with batch size ``batch`` (float tensors redrawn on the CPU, the same on every device,
    and put where the example is; others repeated)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example_inputs:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            out.append(t)
            continue
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=t.dtype).to(t.device))
        else:
            out.append(t[torch.arange(batch, device=t.device) % t.shape[0]])
    return tuple(out)


def onnx_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with all graph optimizations and ``threads`` intra-op threads.

    Its worker threads sleep when idle instead of spinning: sessions timed in turns (`interleaved`) would
    otherwise spin on the cores the next one runs on (at 2 threads, batch 1, a dense DeiT-S ran no faster
    than on one thread, and the compact models looked 25 points slower than they are)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")  # as torch's threads (`flushed_subnormals`)
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return onnx_cpu_session(path, so)


def onnx_cpu_session(path: str | Path, options=None):
    """An onnxruntime CPU session that leaves the calling thread's subnormal mode as it was: the first session of
    a process sets that mode to the session's `set_denormal_as_zero` (off unless asked), once, which would undo
    `flushed_subnormals` (or the caller's own choice) for the rest of the process: `vitcc bench` created its
    sessions first and timed PyTorch after, with subnormals computed."""
    import onnxruntime as ort
    with _subnormal_mode_kept():
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_feed(session, inputs: tuple) -> dict:
    names = [i.name for i in session.get_inputs()]
    arrays = [t.detach().cpu().numpy() for t in inputs if isinstance(t, torch.Tensor)]
    return dict(zip(names, arrays))


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median, min and relative spread (IQR / median) of interleaved samples, per clock."""
    out = {}
    for name, clocks in samples.items():
        row = {}
        for clock, xs in clocks.items():
            if not xs:
                continue
            q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
            med = statistics.median(xs)
            row[clock] = med
            row[f"{clock}_min"] = min(xs)
            row[f"{clock}_iqr"] = (q[2] - q[0]) / med if med else 0.0
        row["n"] = len(clocks.get("wall", []))
        out[name] = row
    return out


