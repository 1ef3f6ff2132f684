"""`vitcc bench MODEL [COMPILED]`: latency of a model and its compiled version, on a chosen device and runtime.

Both models are timed in one process, interleaved (one call of each per round, rotating order), on the
same inputs; the table shows median latencies, the speed-up (median over rounds of the per-round ratio),
the ideal speed-up (the MAC ratio) and the efficiency = speed-up / ideal. On the CPU (`--device cpu`) the
runtimes are eager PyTorch and onnxruntime at `--threads` intra-op threads, timed with the wall clock (with
one thread the JSON also has process CPU time, which a busy machine disturbs less); on a GPU
(`--device cuda`) CUDA events time each call. `--mode` picks how PyTorch runs: eager, one CUDA graph replay
(cudagraph: a GPU only) or torch.compile; `--dtype bf16|fp16` casts weights and inputs (as served, and as
`vitcc profile -o` times a latency table). Without COMPILED,
`--sparsity S` compiles MODEL first (`--target`, `--align`, `--passes` as for `vitcc compile`); with neither,
MODEL alone is timed.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import typer
from rich.console import Console
from rich.table import Table

from vitcc.cli.app import (ARCH_HELP, DEFAULT_ALIGN, DEFAULT_MODEL, MODEL_HELP, WEIGHTS_HELP, _load, app,
                           check_budget, check_threads)
from vitcc.devices import DEVICE_HELP, memory_hint, resolve_device
from vitcc.errors import VitccError
from vitcc.cli.outputs import Outputs


def _batches(text: str) -> list[int]:
    try:
        out = [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        out = []
    if not out or any(b <= 0 for b in out):
        raise VitccError(f"bad --batch {text!r}: expected positive integers like 1,32")
    return out


def _runtimes(text: str) -> list[str]:
    out = [r.strip().lower() for r in text.split(",") if r.strip()]
    out = ["onnx" if r in ("ort", "onnxruntime") else "eager" if r == "torch" else r for r in out]
    bad = set(out) - {"eager", "onnx"}
    if bad or not out:
        raise VitccError(f"bad --runtime {text!r}: use eager (PyTorch, run as --mode says), onnx or eager,onnx")
    return out


def run_bench(models: dict[str, torch.nn.Module], example: tuple, *, batches: list[int], runtimes: list[str],
              threads: int, rounds: int, warmup: int = 2, workdir: Path | None = None,
              on_progress=None, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              modes: Sequence[str] = ("eager",), compile_mode: str = "default") -> dict:
    """Time every model at every (runtime, batch), interleaved, sizes at batch 1; a JSON-able dict. The runtime
    "eager" means PyTorch, run in each of `modes` (rows named eager, cudagraph, compile), on the device the
    models and `example` are on; "onnx" means onnxruntime on the CPU. On the CPU at `threads` intra-op
    threads (torch's for PyTorch, onnxruntime's intra_op_num_threads; torch's count is restored after), freed
    memory kept for the next call and subnormals flushed (vitcc.deploy.timing.timing_on)."""
    from vitcc.deploy.timing import timing_on
    device = torch.device(device) if device is not None else example[0].device
    with timing_on(device, threads if device.type == "cpu" else None):
        return _run_bench(models, example, batches, runtimes, threads, rounds, warmup, workdir, on_progress,
                          device, dtype, list(modes), compile_mode)


def _run_bench(models, example, batches, runtimes, threads, rounds, warmup, workdir, on_progress, device, dtype,
               modes, compile_mode) -> dict:
    from vitcc.deploy.runners import DTYPES, check_mode, compile_settings, make_runner
    from vitcc.deploy.timing import interleaved, loadavg, machine_info, with_batch
    from vitcc.metrics import count_macs, count_params

    rows = (modes if "eager" in runtimes else []) + (["onnx"] if "onnx" in runtimes else [])
    for mode in rows:
        if mode != "onnx":
            check_mode(mode, device, dtype)
    first = next(iter(models))
    sizes = {name: {"params": count_params(m), "macs": count_macs(m, example)} for name, m in models.items()}
    result = {"machine": {**machine_info(threads if device.type == "cpu" else None), **_device_info(device)},
              "device": str(device), "dtype": next(k for k, v in DTYPES.items() if v == dtype),
              "clock": "cuda events" if device.type == "cuda" else "wall", "threads": threads, "rounds": rounds,
              "warmup": warmup, "input_shape": list(example[0].shape), "loadavg_start": loadavg(), "sizes": sizes,
              "runs": []}
    sessions = _onnx_sessions(models, example, threads, workdir, on_progress) if "onnx" in rows else {}
    with compile_settings():
        for runtime in rows:
            for b in batches:
                xs = with_batch(example, b)
                if on_progress:
                    on_progress(f"{runtime} batch {b}")
                if runtime == "onnx":
                    samples = interleaved(_onnx_calls(sessions, xs), rounds=rounds, warmup=warmup)
                else:
                    if runtime == "compile":
                        torch._dynamo.reset()  # every (model, batch) compiled afresh, on an equal footing
                    fns = {n: make_runner(m, xs, runtime, dtype, device=device, compile_mode=compile_mode)
                           for n, m in models.items()}
                    samples = interleaved(fns, rounds=rounds, warmup=warmup, device=device)
                    del fns  # a CUDA graph holds its memory pool until it goes
                result["runs"].append(_run_row(runtime, b, samples, sizes, first))
    result["loadavg_end"] = loadavg()
    return result


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    from vitcc.deploy.timing import heap_policy
    return {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "allocator": heap_policy(device),
            "cudnn": torch.backends.cudnn.version()}


def _onnx_sessions(models, example, threads, workdir, on_progress) -> dict:
    """An onnxruntime CPU session per model, exported from a CPU copy (onnxruntime runs on the CPU here)."""
    from vitcc.deploy.export import export_onnx
    from vitcc.deploy.timing import onnx_session
    tmp = Path(tempfile.mkdtemp(prefix="vitcc-bench-", dir=workdir))
    sessions = {}
    for name, m in models.items():
        if on_progress:
            on_progress(f"onnx export {name}")
        path = tmp / f"{len(sessions)}.onnx"
        export_onnx(m, example, path)
        sessions[name] = onnx_session(path, threads)
    return sessions


def _onnx_calls(sessions: dict, xs: tuple) -> dict:
    from vitcc.deploy.timing import onnx_feed
    return {n: (lambda s=s, f=onnx_feed(s, xs): s.run(None, f)) for n, s in sessions.items()}


def _run_row(runtime: str, batch: int, samples: dict, sizes: dict, first: str) -> dict:
    from vitcc.deploy.timing import summarize
    run = {"runtime": runtime, "batch": batch, "stats": summarize(samples)}
    for n in samples:
        if n == first:
            continue
        ideal = sizes[first]["macs"] / max(sizes[n]["macs"], 1)
        c = run.setdefault("compare", {})[n] = {"ideal": ideal}
        # median over rounds of the per-round ratio: load that changes slower than a round cancels
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            if samples[first].get(clock) and samples[n].get(clock):
                sp = statistics.median(a / c_ for a, c_ in zip(samples[first][clock], samples[n][clock]))
                c[f"speedup{suffix}"], c[f"efficiency{suffix}"] = sp, sp / ideal
    return run


def print_table(result: dict, title: str) -> None:
    out = Console(width=None if Console().is_terminal else 120)
    names = list(result["sizes"])
    t = Table(title=title, show_header=True)
    t.add_column("")
    for n in names:
        t.add_column(n, justify="right")
    if len(names) > 1:
        for col in ("speed-up", "ideal", "efficiency"):
            t.add_column(col, justify="right")
    pad = [""] * (3 if len(names) > 1 else 0)
    t.add_row("parameters", *[f"{result['sizes'][n]['params']:,}" for n in names], *pad)
    t.add_row("MACs (batch 1)", *[f"{result['sizes'][n]['macs']:,}" for n in names], *pad)
    for run in result["runs"]:
        cells = [f"{run['stats'][n]['wall']:.2f} ms" for n in names]
        extra = []
        if len(names) > 1:
            c = run["compare"][names[1]]
            extra = [f"{c['speedup']:.2f}x", f"{c['ideal']:.2f}x", f"{c['efficiency']:.0%}"]
        t.add_row(f"{run['runtime']} batch {run['batch']}", *cells, *extra)
    out.print(t)
    eff = "efficiency = speed-up / ideal (MAC ratio); " if len(names) > 1 else ""
    dtype = "" if result.get("dtype", "fp32") == "fp32" else f", in {result['dtype']}"
    if result.get("clock") == "cuda events":
        out.print(f"medians of {result['rounds']} interleaved rounds on {result['device']} "
                  f"({result['machine'].get('gpu', '')}), timed with CUDA events{dtype}; {eff.rstrip('; ')}")
        return
    m = result["machine"]
    out.print(f"medians of {result['rounds']} interleaved rounds, {result['threads']} thread(s){dtype}, "
              f"{m['allocator']}, {m['subnormals']}; {eff}load average {result['loadavg_start']} -> "
              f"{result['loadavg_end']} on {m['ncpu']} CPUs")


@app.command("bench")
def bench_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    compiled: Optional[str] = typer.Argument(None, help="a compiled model (.pt2, from vitcc compile -o) to compare "
                                             "with MODEL"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="without COMPILED: compile MODEL with this "
                                             "sparsity first"),
    target: str = typer.Option("macs", "--target", help="with --sparsity: channels, params, macs or latency"),
    align: int = typer.Option(DEFAULT_ALIGN, "--align", help="with --sparsity: round kept widths to multiples of N"),
    passes: str = typer.Option("magnitude", "--passes", help="with --sparsity: method passes"),
    batch: str = typer.Option("1", "--batch", help="batch sizes, e.g. 1,32"),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="eager (PyTorch, run as --mode says), onnx "
                                          "(onnxruntime, CPU) or both (default: eager,onnx on the CPU in fp32, else eager)"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    mode: str = typer.Option("eager", "--mode", help="how PyTorch runs: eager, cudagraph (one CUDA graph replay, "
                             "GPU only) or compile (torch.compile), comma-separated for several"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (weights and inputs cast)"),
    compile_mode: str = typer.Option("default", "--compile-mode", help="torch.compile's mode with --mode compile: "
                                     "default, max-autotune-no-cudagraphs, max-autotune or reduce-overhead"),
    threads: int = typer.Option(1, "--threads", help="on the CPU: intra-op threads (torch.set_num_threads for "
                                "PyTorch, onnxruntime's intra_op_num_threads)"),
    rounds: int = typer.Option(10, "--rounds", help="interleaved rounds (one call of each model per round)"),
    warmup: int = typer.Option(2, "--warmup", help="untimed rounds first"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Time MODEL (and COMPILED) on a CPU or GPU, in eager PyTorch, a CUDA graph, torch.compile or onnxruntime;
    print a table."""
    from vitcc.deploy.runners import COMPILE_MODES, check_mode, parse_dtype, parse_modes
    args = SimpleNamespace(**locals())
    args.device = resolve_device(device)
    args.dtype, modes = parse_dtype(dtype), parse_modes(mode)
    batches = _batches(batch)
    fp32_cpu = args.device.type == "cpu" and args.dtype == torch.float32
    runtimes = _runtimes(runtime if runtime is not None else "eager,onnx" if fp32_cpu else "eager")
    if "onnx" in runtimes and not fp32_cpu:
        raise VitccError(f"--runtime onnx runs onnxruntime on the CPU in float32; drop it with --device {device} "
                         f"--dtype {dtype}, or bench onnx with --device cpu --dtype fp32")
    if "eager" in runtimes:
        for m in modes:
            check_mode(m, args.device, args.dtype)
    if compile_mode not in COMPILE_MODES:
        raise VitccError(f"bad --compile-mode {compile_mode!r}: use {', '.join(COMPILE_MODES)}")
    check_threads(threads)
    if rounds < 1 or warmup < 0:
        raise VitccError("--rounds must be >= 1, --warmup >= 0")
    if compiled is not None and sparsity is not None:
        raise VitccError("give either COMPILED or --sparsity, not both")
    check_budget(sparsity, align, target, passes if sparsity is not None else None)
    with Outputs([model, compiled, weights]) as outputs:
        tmp = outputs.plan(json_out, "--json", (".json",))
        with memory_hint("--batch (e.g. --batch 1,64)"):
            result = _bench(args, batches, runtimes, modes)
        if tmp is not None:
            tmp.write_text(json.dumps(result, indent=2))


def _bench(a: SimpleNamespace, batches: list[int], runtimes: list[str], modes: list[str]) -> dict:
    """With the command's arguments `a`: load (and with --sparsity compile), time, print the table; the figures."""
    from vitcc import api
    m, example = _load(a.model, a.weights, a.arch, a.trust_pickle, a.input_shape, a.device)
    models = {"model": m.eval()}
    if a.compiled is not None:
        models["compiled"] = api.load(a.compiled, trust_pickle=a.trust_pickle, device=a.device).eval()
    elif a.sparsity is not None:
        r = api.compile(m, a.passes, sparsity=a.sparsity, example_inputs=example, target=a.target, align=a.align,
                        threads=a.threads if a.target == "latency" else None)  # timed at the count it will run at
        models["compiled"] = r.module.eval()
    console = Console(stderr=True)
    progress = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if console.is_terminal else None
    result = run_bench(models, example, batches=batches, runtimes=runtimes, threads=a.threads, rounds=a.rounds,
                       warmup=a.warmup, on_progress=progress, device=a.device, dtype=a.dtype, modes=modes,
                       compile_mode=a.compile_mode)
    result["model"], result["compiled"] = a.model, a.compiled
    print_table(result, f"vitcc bench {a.model}" + (f" {a.compiled}" if a.compiled else
                                                     f" (compiled at --sparsity {a.sparsity} --target {a.target} "
                                                     f"--align {a.align})" if a.sparsity is not None else ""))
    return result
