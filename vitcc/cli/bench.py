"""`vitcc bench MODEL [COMPILED]`: latency of a model and its compiled version, eager and onnxruntime.

Both models are timed in one process, interleaved (one call of each per round, rotating order), on the
same inputs and thread count; the table shows median latencies, the speed-up (median over rounds of the
per-round ratio), the ideal speed-up (the MAC ratio) and the efficiency = speed-up / ideal. With one
thread the JSON also has the same figures in process CPU time, which a busy machine disturbs less. Without COMPILED, `--sparsity S` compiles MODEL first
(`--target`, `--align`, `--passes` as for `vitcc compile`); with neither, MODEL alone is timed.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from vitcc.cli.app import (ARCH_HELP, DEFAULT_ALIGN, DEFAULT_MODEL, MODEL_HELP, WEIGHTS_HELP, _load, app,
                           check_budget, check_threads)
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
    out = ["onnx" if r in ("ort", "onnxruntime") else r for r in out]
    bad = set(out) - {"eager", "onnx"}
    if bad or not out:
        raise VitccError(f"bad --runtime {text!r}: use eager, onnx or eager,onnx")
    return out


def run_bench(models: dict[str, torch.nn.Module], example: tuple, *, batches: list[int], runtimes: list[str],
              threads: int, rounds: int, warmup: int = 2, workdir: Path | None = None,
              on_progress=None) -> dict:
    """Time every model at every (runtime, batch), interleaved, at `threads` intra-op threads (torch's for eager,
    onnxruntime's intra_op_num_threads; torch's count is restored after); sizes at batch 1. A JSON-able dict."""
    from vitcc.deploy.timing import intra_op_threads
    with intra_op_threads(threads):
        return _run_bench(models, example, batches, runtimes, threads, rounds, warmup, workdir, on_progress)


def _run_bench(models, example, batches, runtimes, threads, rounds, warmup, workdir, on_progress) -> dict:
    from vitcc.deploy.export import export_onnx
    from vitcc.deploy.timing import interleaved, loadavg, onnx_feed, onnx_session, summarize, with_batch
    from vitcc.search.latency import machine_info
    from vitcc.metrics import count_macs, count_params

    first = next(iter(models))
    sizes = {name: {"params": count_params(m), "macs": count_macs(m, example)} for name, m in models.items()}
    result = {"machine": machine_info(threads), "threads": threads, "rounds": rounds, "warmup": warmup,
              "input_shape": list(example[0].shape), "loadavg_start": loadavg(), "sizes": sizes, "runs": []}
    sessions = {}
    if "onnx" in runtimes:
        tmp = Path(tempfile.mkdtemp(prefix="vitcc-bench-", dir=workdir))
        for name, m in models.items():
            if on_progress:
                on_progress(f"onnx export {name}")
            path = tmp / f"{len(sessions)}.onnx"
            export_onnx(m.eval(), example, path)
            sessions[name] = onnx_session(path, threads)
    for runtime in runtimes:
        for b in batches:
            xs = with_batch(example, b)
            if on_progress:
                on_progress(f"{runtime} batch {b}")
            if runtime == "eager":
                fns = {n: (lambda m=m: m(*xs)) for n, m in models.items()}
                for m in models.values():
                    m.eval()
            else:
                fns = {n: (lambda s=s, f=onnx_feed(s, xs): s.run(None, f)) for n, s in sessions.items()}
            samples = interleaved(fns, rounds=rounds, warmup=warmup)
            stats = summarize(samples)
            run = {"runtime": runtime, "batch": b, "stats": stats}
            for n in models:
                if n == first:
                    continue
                ideal = sizes[first]["macs"] / max(sizes[n]["macs"], 1)
                # median over rounds of the per-round ratio: load that changes slower than a round cancels
                sp, spc = (statistics.median(a / c for a, c in zip(samples[first][k], samples[n][k]))
                           for k in ("wall", "cpu"))
                run.setdefault("compare", {})[n] = {"speedup": sp, "speedup_cpu": spc, "ideal": ideal,
                                                    "efficiency": sp / ideal, "efficiency_cpu": spc / ideal}
            result["runs"].append(run)
    result["loadavg_end"] = loadavg()
    return result


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
    out.print(f"medians of {result['rounds']} interleaved rounds, {result['threads']} thread(s); {eff}"
              f"load average {result['loadavg_start']} -> {result['loadavg_end']} on "
              f"{result['machine']['ncpu']} CPUs")


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
    runtime: str = typer.Option("eager,onnx", "--runtime", help="eager, onnx or both"),
    threads: int = typer.Option(1, "--threads", help="intra-op threads (torch.set_num_threads for eager, "
                                "onnxruntime's intra_op_num_threads)"),
    rounds: int = typer.Option(10, "--rounds", help="interleaved rounds (one call of each model per round)"),
    warmup: int = typer.Option(2, "--warmup", help="untimed rounds first"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Time MODEL (and COMPILED) in eager PyTorch and onnxruntime on this machine; print a table."""
    args = SimpleNamespace(**locals())
    batches, runtimes = _batches(batch), _runtimes(runtime)
    check_threads(threads)
    if rounds < 1 or warmup < 0:
        raise VitccError("--rounds must be >= 1, --warmup >= 0")
    if compiled is not None and sparsity is not None:
        raise VitccError("give either COMPILED or --sparsity, not both")
    check_budget(sparsity, align, target, passes if sparsity is not None else None)
    with Outputs([model, compiled, weights]) as outputs:
        tmp = outputs.plan(json_out, "--json")
        result = _bench(args, batches, runtimes)
        if tmp is not None:
            tmp.write_text(json.dumps(result, indent=2))


def _bench(a: SimpleNamespace, batches: list[int], runtimes: list[str]) -> dict:
    """With the command's arguments `a`: load (and with --sparsity compile), time, print the table; the figures."""
    from vitcc import api
    m, example = _load(a.model, a.weights, a.arch, a.trust_pickle, a.input_shape)
    models = {"model": m.eval()}
    if a.compiled is not None:
        models["compiled"] = api.load(a.compiled, trust_pickle=a.trust_pickle).eval()
    elif a.sparsity is not None:
        r = api.compile(m, a.passes, sparsity=a.sparsity, example_inputs=example, target=a.target, align=a.align,
                        threads=a.threads if a.target == "latency" else None)  # timed at the count it will run at
        models["compiled"] = r.module.eval()
    console = Console(stderr=True)
    progress = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if console.is_terminal else None
    result = run_bench(models, example, batches=batches, runtimes=runtimes, threads=a.threads, rounds=a.rounds,
                       warmup=a.warmup, on_progress=progress)
    result["model"], result["compiled"] = a.model, a.compiled
    print_table(result, f"vitcc bench {a.model}" + (f" {a.compiled}" if a.compiled else
                                                     f" (compiled at --sparsity {a.sparsity} --target {a.target} "
                                                     f"--align {a.align})" if a.sparsity is not None else ""))
    return result
