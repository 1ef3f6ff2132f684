"""`vitcc profile MODEL`: measure the latency table that `vitcc compile --target latency` selects against.

Without -o: the table a compile would measure when given none (eager, fp32, the input's batch, on --device at
--threads), kept in the cache that compile reads (`$VITCC_CACHE/tables/`, default `~/.cache/vitcc`), so that the
next compile of this model there measures nothing; it prints what the table predicts at uniform pruning fractions
(`--grid`), and with `--check` builds the compact model at each and measures it. With -o: a table in any mode,
dtype and batch, written to a file that `compile --latency-table` reads on any machine (vitcc.profiling).
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
                  prune=None, check: bool = False, rounds: int = 7, threads: int | None = None,
                  announce=None, on_progress=None) -> dict:
    """The cached table of ``model`` on the example's device at ``threads`` intra-op threads (measured now if the
    cache has none), and what it predicts at each uniform fraction of ``grid`` (with ``check``, measured too)."""
    import statistics

    from vitcc import api
    from vitcc.deploy.timing import cpu_clock_ok, interleaved, loadavg, timing_on
    from vitcc.devices import device_of
    from vitcc.frontend.capture import capture
    from vitcc.ir.program import Program
    from vitcc.ir.selection import prune_kinds
    from vitcc.pipeline.manager import make_pass
    from vitcc.profiling import table_for
    from vitcc.search.budget import select_uniform
    from vitcc.search.cost import estimate
    from vitcc.search.latency_table import TableCost

    model, dev = model.eval(), device_of(model)
    gm = capture(model, example)
    table, where = table_for(gm, example, device=dev, threads=threads, announce=announce, on_progress=on_progress)
    program = Program(gm=gm, example_inputs=example, original=gm)
    make_pass("analyze").run(program)
    for g in program.groups:
        program.scores[g.name] = torch.arange(g.size, 0, -1, dtype=torch.float32)
    cost, kinds = TableCost(program, table, where), prune_kinds(prune)
    dense_pred, macs0 = cost.dense(), estimate(program, {})[1]
    clock = "cpu" if dev.type == "cpu" and cpu_clock_ok(threads) else "wall"
    rows = []
    for frac in grid:
        keep = select_uniform(program, frac, kinds, align, "uniform")
        by_root = keep.by_root(program.groups)
        pred = cost(by_root)
        row = {"fraction": frac, "macs_kept": estimate(program, by_root)[1] / max(macs0, 1), "predicted_ms": pred,
               "predicted_kept": pred / dense_pred, "widths": keep.widths(program.groups)}
        if check:
            compact = api.compile(model, "magnitude", example_inputs=example, keep=keep).module.eval()
            with timing_on(dev, threads):
                s = interleaved({"dense": lambda: model(*example), "compact": lambda: compact(*example)},
                                rounds=rounds, device=dev)
            d, c = statistics.median(s["dense"][clock]), statistics.median(s["compact"][clock])
            row.update(measured_dense_ms=d, measured_ms=c, measured_kept=c / d, clock=clock)
        rows.append(row)
    m = table["measured"]
    return {"table": where, "measured": m, "profile_s": table.get("seconds"), "units": len(table["units"]),
            "branches": len(table["branches"]), "dense_ms": table["dense_ms"], "rest_ms": table["rest_ms"],
            "dense_predicted_ms": dense_pred, "align": align, "clock": clock, "rows": rows, "loadavg": loadavg()}


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
    device: str = typer.Option("cpu", "--device", help="where to measure (cpu, cuda, cuda:N)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="with -o: fp32 (default), bf16 or fp16"),
    batch: Optional[int] = typer.Option(None, "--batch", help="with -o: the batch the model will run at "
                                        "(default: the input shape's)"),
    mode: Optional[str] = typer.Option(None, "--mode", help="with -o: eager (default), cudagraph (CUDA graph "
                                       "replay) or compile (torch.compile)"),
    points: Optional[int] = typer.Option(None, "--points", help="with -o: the most widths timed per kind "
                                         "(default 16)"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="with -o: passes over the grid, one after "
                                          "another, averaged (default 2: a shared machine's slow spells outlast a "
                                          "point, not a pass; 1 takes half the time)"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Measure the latency table of MODEL on --device into the cache `compile --target latency` reads, and show
    what it predicts; with -o, write a table in any mode, dtype and batch that `compile --latency-table` reads
    anywhere."""
    dev = resolve_device(device)
    only_with_o = [flag for flag, v in (("--dtype", dtype), ("--batch", batch), ("--mode", mode),
                                        ("--points", points), ("--repeats", repeats)) if v is not None]
    if output is None and only_with_o:
        raise VitccError(f"{only_with_o[0]} applies to a table written with -o TABLE.json; without -o, profile "
                         "measures what `compile --target latency` would (eager, fp32, the input's batch)")
    fractions = _grid(grid)
    check_threads(threads)
    if align < 1 or rounds < 1:
        raise VitccError("--align and --rounds must be >= 1")
    if output is not None:
        return _table_cmd(model, output, device, dtype or "fp32", batch, mode or "eager", threads,
                          16 if points is None else points, 2 if repeats is None else repeats, weights, arch,
                          input_shape, trust_pickle)
    with Outputs([model, weights]) as outputs:
        tmp = outputs.plan(json_out, "--json", (".json",))
        m, example = _load(model, weights, arch, trust_pickle, input_shape, dev)
        err = Console(stderr=True)
        res = profile_model(m, example, grid=fractions, align=align, prune=prune, check=check, rounds=rounds,
                            threads=threads, announce=lambda line: err.print(line, style="dim", highlight=False),
                            on_progress=_steps(err))
        if tmp is not None:
            tmp.write_text(json.dumps(res, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        _print_profile(model, example, res, align, check)


def _table_cmd(model: str, output: Path, device: str, dtype: str, batch: Optional[int], mode: str,
               threads: Optional[int], points: int, repeats: int, weights, arch, input_shape, trust_pickle) -> None:
    """`vitcc profile MODEL -o TABLE.json`: measure a latency table on --device and write it."""
    from vitcc.profiling import DTYPES, MODES, profile_table, resolve_device, write_table
    if mode not in MODES:
        raise VitccError(f"unknown --mode {mode!r}; use {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise VitccError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    if batch is not None and batch < 1 or points < 2 or repeats < 1:
        raise VitccError("--batch and --repeats must be >= 1, --points >= 2")
    resolve_device(device)  # no CUDA: one line, before the model is loaded
    with Outputs([model, weights]) as outputs:
        tmp = outputs.plan(output, "-o", (".json",))
        m, example = _load(model, weights, arch, trust_pickle, input_shape)
        table = profile_table(m, example, device=device, dtype=dtype, batch=batch, mode=mode, threads=threads,
                              model_spec=model, points=points, repeats=repeats,
                              on_progress=_steps(Console(stderr=True)))
        write_table(table, tmp)
    meas = table["measured"]
    Console().print(f"latency table {output}: {meas['model']} on {meas['device_name']} ({meas['device']}, "
                    f"{meas['dtype']}, batch {meas['batch']}, {meas['mode']}, {meas['threads']} thread(s)): dense "
                    f"{table['dense_ms']:.3f} ms = {len(table['units'])} unit(s) for {len(table['branches'])} "
                    f"branches + {table['rest_ms']:.3f} ms rest; {repeats} pass(es), {table['seconds']:.1f} s",
                    highlight=False)


def _steps(err: Console):
    """Each step of a table's measurement as a dim line on a terminal (minutes of work); nothing in a log."""
    return (lambda step: err.print(step, style="dim", highlight=False)) if err.is_terminal else None


def _print_profile(model: str, example: tuple, res: dict, align: int, check: bool) -> None:
    out = Console(width=None if Console().is_terminal else 120)
    m = res["measured"]
    where = f"{m['device']}" + (f", {m['threads']} thread(s)" if m["device"] == "cpu" else "")
    t = Table(title=f"vitcc profile {model} (input {tuple(example[0].shape)}, {where}, align {align})")
    cols = ["removed", "residual", "heads", "MACs kept", "predicted", "pred. kept"]
    cols += ["meas. kept", "error"] if check else []
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    t.add_row("0", "", "", "100.0%", f"{res['dense_predicted_ms']:.3g} ms", "100.0%",
              *(["", ""] if check else []))
    for r in res["rows"]:
        w = r["widths"]
        cells = [f"{r['fraction']:g}", f"{w.get('residual', {}).get('after', '-')}",
                 f"{w.get('heads', {}).get('after', '-')}", f"{r['macs_kept']:.1%}", f"{r['predicted_ms']:.3g} ms",
                 f"{r['predicted_kept']:.1%}"]
        if check:
            cells += [f"{r['measured_kept']:.1%}", f"{(r['predicted_kept'] - r['measured_kept']) * 100:+.1f} pt"]
        t.add_row(*cells)
    out.print(t)
    out.print(f"table: {res['table']}; dense {res['dense_ms']:.3g} ms = {res['units']} unit(s) for "
              f"{res['branches']} branches + {res['rest_ms']:.3g} ms rest (on {m['device_name']}, {m['allocator']}"
              f"{', ' + m['subnormals'] if m.get('subnormals') else ''}); "
              f"load average {res['loadavg']}", highlight=False)
    if check and res["clock"] == "wall" and m["device"] == "cpu":
        out.print(f"note: with {m['threads']} threads the check is timed in wall-clock time, which other processes "
                  "on this machine disturb; `--threads 1` times it in CPU time", highlight=False)
