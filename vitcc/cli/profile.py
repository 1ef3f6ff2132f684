"""`vitcc profile MODEL`: measure the per-op latency model for MODEL on this machine and cache it.

Times every compute op of MODEL at the widths a uniform pruning fraction gives, for a grid of fractions,
and the whole dense model (which calibrates what is not timed op by op). The timings land in the cache
that `vitcc compile --target latency` reads (`$VITCC_CACHE/latency/`, default `~/.cache/vitcc`), keyed by
this machine, torch version, thread count and the op shapes. `--check` also builds the compact model at
each fraction and measures it, to show how far the prediction is from the real thing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from vitcc.cli.app import ARCH_HELP, DEFAULT_ALIGN, DEFAULT_MODEL, MODEL_HELP, WEIGHTS_HELP, _load, app, check_threads
from vitcc.devices import resolve_device
from vitcc.errors import VitccError
from vitcc.cli.outputs import Outputs


def _grid(text: str) -> list[float]:
    try:
        out = [float(g) for g in text.replace(" ", "").split(",") if g]
    except ValueError:
        out = []
    if not out or any(not 0.0 <= g < 1.0 for g in out):
        raise VitccError(f"bad --grid {text!r}: expected fractions in [0, 1) like 0.25,0.5,0.75")
    return out


def profile_model(model: torch.nn.Module, example: tuple, *, grid: list[float], align: int = 1,
                  prune=None, check: bool = False, rounds: int = 7, on_progress=None,
                  threads: int | None = None) -> dict:
    """Fill the latency cache for ``model`` at ``threads`` intra-op threads (default: torch's; each count has its
    own cache) and return predicted (and, with ``check``, measured) latencies."""
    from vitcc.deploy.timing import timing_on
    with timing_on("cpu", threads):
        return _profile_model(model, example, grid, align, prune, check, rounds, on_progress)


def _profile_model(model, example, grid, align, prune, check, rounds, on_progress) -> dict:
    import statistics

    from vitcc import api
    from vitcc.search.cost import estimate
    from vitcc.frontend.capture import capture
    from vitcc.ir.program import Program
    from vitcc.search.latency import LatencyModel
    from vitcc.deploy.timing import interleaved, loadavg
    from vitcc.pipeline.manager import make_pass
    from vitcc.ir.selection import prune_kinds
    from vitcc.search.budget import select_uniform

    model = model.eval()
    program = Program(gm=capture(model, example), example_inputs=example)
    make_pass("analyze").run(program)
    for g in program.groups:
        program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
    kinds = prune_kinds(prune)
    lm = LatencyModel(program)
    if on_progress:
        on_progress("dense model")
    dense_pred = lm.predict({})
    macs0 = estimate(program, {})[1]
    rows = []
    for frac in grid:
        if on_progress:
            on_progress(f"fraction {frac:g}")
        keep = select_uniform(program, frac, kinds, align, "uniform")
        by_root = keep.by_root(program.groups)
        pred = lm.predict(by_root)
        row = {"fraction": frac, "macs_kept": estimate(program, by_root)[1] / max(macs0, 1),
               "predicted_ms": pred, "predicted_kept": pred / dense_pred,
               "breakdown": lm.breakdown(by_root),
               "widths": keep.widths(program.groups)}
        if check:
            compact = api.compile(model, "magnitude", example_inputs=example, keep=keep, verify=False).module.eval()
            clock = "cpu" if lm.clock == "thread" else "wall"
            s = interleaved({"dense": lambda: model(*example), "compact": lambda: compact(*example)}, rounds=rounds)
            d, c = statistics.median(s["dense"][clock]), statistics.median(s["compact"][clock])
            row.update(measured_dense_ms=d, measured_ms=c, measured_kept=c / d, clock=clock)
        rows.append(row)
    path = lm.save() or lm.table.path
    return {"cache": str(path), "machine": lm.table.info, "entries": len(lm.table), "measured_now": lm.table.measured,
            "dense_predicted_ms": dense_pred, "dense_measured_ms": lm.dense_measured_ms(),
            "overhead_ms": lm.overhead_ms, "dense_breakdown": lm.breakdown({}), "align": align,
            "clock": lm.clock, "rows": rows, "loadavg": loadavg()}


@app.command("profile")
def profile_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    align: int = typer.Option(DEFAULT_ALIGN, "--align", help="align kept widths as `compile --align` will"),
    grid: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", "--grid",
                             help="uniform fractions of every group to remove"),
    prune: str = typer.Option("residual,heads,head_dim,mlp", "--prune", help="group kinds to prune"),
    threads: Optional[int] = typer.Option(None, "--threads", help="intra-op threads the model will run with "
                                          "(cached per count; `compile --target latency --threads N` reads it; "
                                          "default: torch's)"),
    check: bool = typer.Option(False, "--check", help="also build and time the compact model at each fraction"),
    rounds: int = typer.Option(7, "--rounds", help="with --check: interleaved rounds"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write a latency table (JSON) that "
                                          "`compile --target latency --latency-table` reads on any machine: each "
                                          "residual branch timed at a grid of its widths on --device in --mode"),
    device: str = typer.Option("cpu", "--device", help="with -o: where to measure (cpu, cuda, cuda:N)"),
    dtype: str = typer.Option("fp32", "--dtype", help="with -o: fp32, bf16 or fp16"),
    batch: Optional[int] = typer.Option(None, "--batch", help="with -o: the batch the model will run at "
                                        "(default: the input shape's)"),
    mode: str = typer.Option("eager", "--mode", help="with -o: eager, cudagraph (CUDA graph replay) or compile "
                             "(torch.compile)"),
    points: int = typer.Option(16, "--points", help="with -o: the most widths timed per kind"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Measure and cache per-op latencies of MODEL on this machine (used by `compile --target latency`); with
    -o, write a latency table measured on --device that `compile --latency-table` reads anywhere."""
    dev = resolve_device(device)
    if output is None and dev.type != "cpu":  # the per-op cache model builds and times its ops on the CPU
        raise VitccError(f"profile --device {device} measures a latency table: add -o TABLE.json (without -o, the "
                         "per-op cache is timed on the CPU; use --device cpu)")
    fractions = _grid(grid)
    check_threads(threads)
    if align < 1 or rounds < 1:
        raise VitccError("--align and --rounds must be >= 1")
    if output is not None:
        return _table_cmd(model, output, device, dtype, batch, mode, threads, points, weights, arch, input_shape,
                          trust_pickle)
    with Outputs([model, weights]) as outputs:
        tmp = outputs.plan(json_out, "--json", (".json",))
        m, example = _load(model, weights, arch, trust_pickle, input_shape, dev)
        err = Console(stderr=True)
        progress = (lambda msg: err.print(f"[dim]{msg}[/dim]")) if err.is_terminal else None
        res = profile_model(m, example, grid=fractions, align=align, prune=prune, check=check, rounds=rounds,
                            on_progress=progress, threads=threads)
        if tmp is not None:
            tmp.write_text(json.dumps(res, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        _print_profile(model, example, res, align, check)


def _table_cmd(model: str, output: Path, device: str, dtype: str, batch: Optional[int], mode: str,
               threads: Optional[int], points: int, weights, arch, input_shape, trust_pickle) -> None:
    """`vitcc profile MODEL -o TABLE.json`: measure a latency table on --device and write it."""
    from vitcc.profiling import DTYPES, MODES, profile_table, resolve_device, write_table
    if mode not in MODES:
        raise VitccError(f"unknown --mode {mode!r}; use {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise VitccError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    if batch is not None and batch < 1 or points < 2:
        raise VitccError("--batch must be >= 1 and --points >= 2")
    resolve_device(device)  # no CUDA: one line, before the model is loaded
    with Outputs([model, weights]) as outputs:
        tmp = outputs.plan(output, "-o", (".json",))
        m, example = _load(model, weights, arch, trust_pickle, input_shape)
        err = Console(stderr=True)
        progress = (lambda msg: err.print(f"[dim]{msg}[/dim]")) if err.is_terminal else None
        table = profile_table(m, example, device=device, dtype=dtype, batch=batch, mode=mode, threads=threads,
                              model_spec=model, points=points, on_progress=progress)
        write_table(table, tmp)
    meas = table["measured"]
    Console().print(f"latency table {output}: {meas['model']} on {meas['device_name']} ({meas['device']}, "
                    f"{meas['dtype']}, batch {meas['batch']}, {meas['mode']}, {meas['threads']} thread(s)): dense "
                    f"{table['dense_ms']:.3f} ms = {len(table['units'])} unit(s) for {len(table['branches'])} "
                    f"branches + {table['rest_ms']:.3f} ms rest; {table['seconds']:.1f} s", highlight=False)


def _print_profile(model: str, example: tuple, res: dict, align: int, check: bool) -> None:
    out = Console(width=None if Console().is_terminal else 120)
    t = Table(title=f"vitcc profile {model} (input {tuple(example[0].shape)}, {res['machine']['threads']} "
                    f"thread(s), align {align})")
    cols = ["removed", "residual", "heads", "MACs kept", "predicted", "pred. kept"]
    cols += ["meas. kept", "error"] if check else []
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    t.add_row("0", "", "", "100.0%", f"{res['dense_predicted_ms']:.2f} ms", "100.0%",
              *(["", ""] if check else []))
    for r in res["rows"]:
        w = r["widths"]
        cells = [f"{r['fraction']:g}", f"{w.get('residual', {}).get('after', '-')}",
                 f"{w.get('heads', {}).get('after', '-')}", f"{r['macs_kept']:.1%}", f"{r['predicted_ms']:.2f} ms",
                 f"{r['predicted_kept']:.1%}"]
        if check:
            cells += [f"{r['measured_kept']:.1%}", f"{(r['predicted_kept'] - r['measured_kept']) * 100:+.1f} pt"]
        t.add_row(*cells)
    out.print(t)
    bd = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["dense_breakdown"].items(), key=lambda kv: -kv[1]))
    out.print(f"dense: measured {res['dense_measured_ms']:.2f} ms = timed ops ({bd} ms) + untimed "
              f"{res['overhead_ms']:.2f} ms; clock: {res['clock']}")
    out.print(f"cache: {res['cache']} ({res['entries']} entries, {res['measured_now']} measured now); "
              f"load average {res['loadavg']}")
    if res["clock"] == "wall":
        out.print(f"note: with {res['machine']['threads']} threads ops are timed in wall-clock time, which other "
                  "processes on this machine disturb; `--threads 1` (and `torch.set_num_threads(1)` or "
                  "OMP_NUM_THREADS=1 for compile) times them in CPU time")
