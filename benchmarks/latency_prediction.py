"""How well a latency table predicts: the check behind `--target latency`, on any device.

`vitcc.profiling.profile_table` measures the table (what `vitcc profile -o` writes) in one mode, dtype and batch;
then random selections (one kept fraction in [0.25, 1] per lane, i.e. per kind and slot, widths of 64 or more
rounded to 16; with --remove, up to that many residual branches removed) are compiled with
`vitcc.compile(keep=...)` (verified), and so are the selections `--target latency` finds against the table (the
search goes where the table says the device is slow, the corners random draws miss); their latency is predicted
from the table (`TableCost`, as the search predicts it) and measured against the dense model in the same mode, all
interleaved in one run (vitcc.cli.bench.run_bench: CUDA events on a GPU). Reported per selection and summarised:
the predicted and measured latency as a fraction of dense, the error in points, its median, worst and mean (bias).

Usage:  python benchmarks/latency_prediction.py [--device cpu] [--threads 1] [--mode eager] [--dtype fp32]
                  [--batch 1] [--model deit_small_patch16_224] [--depth N] [--selections 16] [--points 8]
                  [--remove 0] [--searched 0.25,0.5,0.75]
        python benchmarks/latency_prediction.py --device cuda --dtype bf16 --mode eager --batch 256
        python benchmarks/latency_prediction.py --replay benchmarks/results/latency_prediction.json
Writes benchmarks/results/latency_prediction.md and .json (see --out), with the command that made them, and the
table beside them (.table.json). `--replay RESULTS.json` predicts a run's selections again from its table with
this vitcc and sets the errors beside the recorded ones, nothing timed: a change to the latency model is checked
on any machine against measurements already made, a GPU's included. (Which errors come from the table and which
from the timing of the selections: replay one run's selections against another run's table, `--table`.)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import vitcc
from vitcc.cli.bench import run_bench
from vitcc.deploy.runners import DTYPES, MODES
from vitcc.deploy.timing import flush_subnormals_in_this_process, loadavg, timing_on
from vitcc.devices import resolve_device
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture
from vitcc.ir.program import Program
from vitcc.ir.selection import PRUNE_KINDS, KeptByRoot
from vitcc.ir.spaces import find
from vitcc.pipeline.manager import make_pass
from vitcc.profiling import profile_table, read_table, write_table
from vitcc.search.latency_table import TableCost, lanes, model_fingerprint

HERE = Path(__file__).resolve().parent
LATENCY_PRUNE = ",".join(k for k in PRUNE_KINDS if k != "other")  # what the searched rows may prune (as gpu.py)


def random_selections(program: Program, n: int, seed: int, removals: int = 0) -> list[tuple[dict[str, int], list[str]]]:
    """Kept widths per group: one fraction per lane (groups a fused reshape ties share a lane, so they stay equal);
    and 0 to `removals` residual branches removed whole (their groups go with them)."""
    rng = random.Random(seed)
    lane_of = lanes(program)
    groups = [g for g in program.groups if g.prunable]
    removable = [b for b in program.branches if b.prunable]
    out = []
    for _ in range(n):
        frac = {lane: rng.uniform(0.25, 1.0) for lane in sorted(set(lane_of[g.name] for g in groups))}
        removed = sorted(b.name for b in rng.sample(removable, rng.randint(0, min(removals, len(removable))))) \
            if removals else []  # (without, the draws are those of the runs before --remove)
        gone = {g for b in removable if b.name in removed for g in b.groups}
        kept = {}
        for g in groups:
            k = g.size * frac[lane_of[g.name]]
            if g.name not in gone:
                kept[g.name] = min(g.size, max(16, round(k / 16) * 16)) if g.size >= 64 else max(1, round(k))
        out.append((kept, removed))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--mode", default="eager", choices=MODES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU: intra-op threads (1: the thread's CPU clock)")
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--depth", type=int, default=None, help="blocks (default: the model's own)")
    ap.add_argument("--selections", type=int, default=16)
    ap.add_argument("--points", type=int, default=8, help="widths timed per kind in the table")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the table's grid, averaged (as `vitcc "
                    "profile -o` does by default)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remove", type=int, default=0, help="remove up to this many residual branches per selection")
    ap.add_argument("--searched", type=lambda v: [float(f) for f in v.split(",") if f], default=[0.25, 0.5, 0.75],
                    help="also the selections `--target latency` finds against the table at these sparsities")
    ap.add_argument("--prune", default=LATENCY_PRUNE, help="the kinds the searched selections may prune")
    ap.add_argument("--out", default=str(HERE / "results" / "latency_prediction"))
    ap.add_argument("--replay", metavar="RESULTS.json", default=None,
                    help="predict a run's selections again from its table with this vitcc; nothing is timed")
    ap.add_argument("--table", default=None, help="with --replay: this table instead of the run's own")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(Path(args.replay), Path(args.table) if args.table else None)
    command = "python benchmarks/latency_prediction.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    dev = resolve_device(args.device)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, x = make_model(args.model, args.depth, args.batch)
    load_start = loadavg()
    with timing_on(dev, args.threads):  # (CPU: one steady heap for the table and the bench)
        t0 = time.perf_counter()
        table = profile_table(model, (x,), device=dev, dtype=args.dtype, mode=args.mode, threads=args.threads,
                              points=args.points, repeats=args.repeats, model_spec=f"timm:{args.model}")
        profile_s = time.perf_counter() - t0
        program = analyzed(model, x)
        cost = TableCost(program, table)
        # the same table without its joint points: every unit's slot ratios multiplied, no floor fitted
        no_floor = TableCost(program, {**table, "units": {s: {k: v for k, v in u.items() if k != "joint"}
                                                          for s, u in table["units"].items()}})
        models, rows = {"dense": model.to(dev)}, []
        drawn = random_selections(program, args.selections, args.seed, args.remove)
        compiled = [(f"s{i}", vitcc.compile(model, None, example_inputs=(x.to(dev),),
                                            keep={**{g: range(k) for g, k in kept.items()}, **{b: [] for b in gone}}))
                    for i, (kept, gone) in enumerate(drawn)]
        compiled += [(f"search{round(100 * s)}", vitcc.compile(model, None, example_inputs=(x.to(dev),), sparsity=s,
                                                                target="latency", latency_table=table, prune=args.prune,
                                                                align=16))
                     for s in args.searched]
        for name, r in compiled:
            removed = sorted(r.selection.removed)
            gone = {g for b in program.branches if b.name in removed for g in b.groups}
            kept = {g.name: len(r.selection.get(g.name, range(g.size))) for g in program.groups
                    if g.prunable and g.name not in gone}
            by_root = kept_by_root(program, kept, removed)
            models[name] = r.module.eval()
            rows.append({"selection": name, "kept": kept, "removed": removed,
                         "predicted": cost(by_root) / cost.dense(),
                         "predicted_no_floor": no_floor(by_root) / no_floor.dense(),
                         "max_abs_error": r.report["max_abs_error"]})
        bench = run_bench(models, (x.to(dev),), batches=[args.batch], runtimes=["eager"], modes=[args.mode],
                          threads=args.threads or torch.get_num_threads(), rounds=args.rounds, device=dev,
                          dtype=DTYPES[args.dtype])
    compare = bench["runs"][0]["compare"]
    clock = "_cpu" if dev.type == "cpu" and (args.threads or torch.get_num_threads()) == 1 else ""
    for row in rows:
        row["measured"] = 1 / compare[row["selection"]][f"speedup{clock}"]
        row["error_points"] = 100 * (row["predicted"] - row["measured"])
        row["error_points_no_floor"] = 100 * (row["predicted_no_floor"] - row["measured"])
    summary = {**summarize([r["error_points"] for r in rows]),
               "no_floor": summarize([r["error_points_no_floor"] for r in rows]),
               "searched": summarize([r["error_points"] for r in rows if r["selection"].startswith("search")])}
    floors = {u["role"]: round(cost.floors[sig] / float(u["dense_ms"]), 3) for sig, u in table["units"].items()}
    data = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "vitcc": vitcc.__version__,
                         "python": platform.python_version()},
            "machine": table["measured"]["device_name"], "loadavg": [load_start, loadavg()],
            "settings": {k: getattr(args, k) for k in ("device", "dtype", "mode", "batch", "threads", "model", "depth",
                                                       "selections", "points", "repeats", "rounds", "seed", "remove",
                                                       "searched", "prune")},
            "clock": "thread CPU time" if clock else bench["clock"], "profile_s": round(profile_s, 1),
            "seconds": round(time.perf_counter() - started, 1), "table_dense_ms": table["dense_ms"],
            "floors": floors, "summary": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_table(table, out.with_suffix(".table.json"))
    out.with_suffix(".md").write_text(render(data, program))
    print(render(data, program))
    return 0


def make_model(name: str, depth: int | None, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    model = timm.create_model(name, pretrained=False, **({"depth": depth} if depth else {})).eval()
    return model, torch.randn(batch, 3, *model.pretrained_cfg["input_size"][1:])


def analyzed(model: torch.nn.Module, x: torch.Tensor) -> Program:
    program = Program(gm=capture(model, (x,)), example_inputs=(x,), original=None)
    make_pass("analyze").run(program)
    return program


def kept_by_root(program: Program, kept: dict[str, int], removed) -> KeptByRoot:
    """A selection's kept widths by group name as the cost models read them."""
    roots = {g.name: find(g.space).id for g in program.groups}
    return KeptByRoot({roots[g]: range(k) for g, k in kept.items()}, removed)


def replay(results: Path, table_path: Path | None = None) -> int:
    """A run's selections predicted again, from its table (or `table_path`) with this vitcc, beside what was
    recorded. The model is built again at batch 1 on the CPU: a table fits the graph whatever its batch."""
    data = json.loads(results.read_text())
    table_path = table_path or results.with_suffix(".table.json")
    if not table_path.exists():
        print(f"no table {table_path}: this run kept none (runs before --replay existed did not); rerun it")
        return 2
    st = data["settings"]
    model, x = make_model(st["model"], st["depth"], 1)
    program = analyzed(model, x)
    table = read_table(table_path)
    there = table["measured"].get("torch")
    if there != torch.__version__:  # another torch may capture other ops (the fingerprint): the branches and groups
        # are what a prediction reads, and the table's names for them must still be this graph's (TableCost checks)
        print(f"the table was measured under torch {there}, this is {torch.__version__}: read by branch and group")
        table["measured"].update(model_fingerprint(program.gm, program.example_inputs))
    try:
        cost = TableCost(program, table, str(table_path))
    except VitccError as e:
        print(e)
        return 2
    rows, dense = data["rows"], cost.dense()
    now = [100 * (cost(kept_by_root(program, r["kept"], r.get("removed", []))) / dense - r["measured"]) for r in rows]
    was, again = summarize([r["error_points"] for r in rows]), summarize(now)
    print(f"{results} ({st['model']}, {st['mode']}, {st['dtype']}, batch {st['batch']}, {data['machine']}) from "
          f"{table_path}, with vitcc {vitcc.__version__} (the run: {data['versions']['vitcc']})")
    for name, s in (("recorded", was), ("now", again)):
        print(f"  {name:8s} median |error| {s['median_abs_points']:.2f} points, worst {s['worst_abs_points']:.2f}, "
              f"bias {s['bias_points']:+.2f}, {s['within_5_points']} of {len(rows)} within 5 points")
    print("  selection  measured  error recorded  error now")
    for r, e in zip(rows, now):
        print(f"  {r['selection']:9s} {r['measured']:8.1%} {r['error_points']:+14.1f} {e:+10.1f}")
    return 0


def summarize(errors: list[float]) -> dict:
    if not errors:
        return {}
    return {"median_abs_points": statistics.median(abs(e) for e in errors), "worst_abs_points": max(map(abs, errors)),
            "bias_points": statistics.fmean(errors), "within_5_points": sum(abs(e) <= 5 for e in errors)}


def render(d: dict, program: Program) -> str:
    s, st = d["summary"], d["settings"]
    lane_of = lanes(program)
    lane_names = sorted({lane_of[g.name] for g in program.groups if g.prunable})
    sizes = {g.name: g.size for g in program.groups}
    lines = [f"# How well a latency table predicts ({st['model']}{', ' + str(st['depth']) + ' blocks' if st['depth'] else ''}, "
             f"{st['mode']}, {st['dtype']}, batch {st['batch']}, {d['machine']})", "",
             f"Command: `{d['command']}`", "",
             f"{d['date']}; torch {d['versions']['torch']}, timm {d['versions']['timm']}, vitcc {d['versions']['vitcc']}; "
             f"device {st['device']}" + (f", {st['threads']} thread(s)" if st["threads"] else "") +
             f"; clock: {d['clock']}; load average {d['loadavg'][0]} -> {d['loadavg'][1]}; table measured in "
             f"{d['profile_s']} s ({st['points']} widths per kind, {st.get('repeats', 1)} pass(es) averaged), "
             f"{d['seconds']} s in all.", "",
             "`vitcc profile` measures the table; each selection (one kept fraction per lane, drawn from [0.25, 1]"
             + (f", and 0 to {st['remove']} residual branches removed" if st.get("remove") else "") + ") is "
             "compiled with `vitcc.compile(keep=...)` (verified), predicted from the table as the search predicts it, "
             "and measured against dense, all interleaved in one run "
             f"({st['rounds']} rounds, median of the per-round ratio). Latency as a fraction of dense; error = "
             "predicted - measured, in points.", "",
             f"**Median |error| {s['median_abs_points']:.1f} points, worst {s['worst_abs_points']:.1f}, bias "
             f"{s['bias_points']:+.1f}; {s['within_5_points']} of {len(d['rows'])} within 5 points.**", "",
             *([f"The selections `--target latency` finds against the table (search25 ...: that sparsity of the "
                f"predicted latency, `--prune {st['prune']}`, `--align 16`): median |error| "
                f"{s['searched']['median_abs_points']:.1f}, worst {s['searched']['worst_abs_points']:.1f}, bias "
                f"{s['searched']['bias_points']:+.1f}.", ""] if s.get("searched") else []),
             f"Without the floors fitted to the joint points (each unit's slot ratios multiplied): median "
             f"{s['no_floor']['median_abs_points']:.1f}, worst {s['no_floor']['worst_abs_points']:.1f}, bias "
             f"{s['no_floor']['bias_points']:+.1f}, {s['no_floor']['within_5_points']} within 5 points. Floors "
             "fitted (fraction of the unit's dense time): " + ", ".join(f"{k} {v:.0%}" for k, v in d["floors"].items())
             + ".", "",
             "| selection | " + " | ".join(f"{n} kept" for n in lane_names) + " | branches removed | predicted | "
             "measured | error | error without floors |",
             "| --- | " + " | ".join("---:" for _ in lane_names) + " | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["rows"]:
        kept = {n: sum(k for g, k in r["kept"].items() if lane_of[g] == n) /
                max(1, sum(sizes[g] for g in r["kept"] if lane_of[g] == n)) for n in lane_names}
        lines.append(f"| {r['selection']} | " + " | ".join(f"{kept[n]:.0%}" for n in lane_names) +
                     f" | {len(r.get('removed', []))}" +
                     f" | {r['predicted']:.1%} | {r['measured']:.1%} | {r['error_points']:+.1f} | "
                     f"{r['error_points_no_floor']:+.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    flush_subnormals_in_this_process()  # before torch starts a thread, as `vitcc` does
    sys.exit(main())
