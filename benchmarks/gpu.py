"""vitcc on a GPU: dense vs compact DeiT-S, ViT-B and Swin-T (timm, random weights), one prepared run.

Sections (each in its own try/except: an error is recorded in the results and the run goes on; a section
that would not fit the time budget is skipped with a note):

* device  -- `vitcc.compile` with the model and inputs on the device (capture, scoring, selection, rewrite,
             verify in exact float32), the compact model returned there, written and read back on the CPU;
* native  -- DeiT-S pruned to half its residual width, heads and MLP (head dims kept: DeiT-Tiny's shape)
             against timm's own DeiT-Tiny, in eager at the large batch, a CUDA graph at batch 1 and
             torch.compile at the large batch (aim: within 3%);
* speedups -- `--target macs` at 25/50/75% (`--align 16`), speed-up and efficiency (speed-up / MAC ratio) in
             eager at the large batch, a CUDA graph at batch 1 and torch.compile at the large batch, dense and
             compacts of one model interleaved (torch.compile rows at 50% first, the rest as time allows);
* compile -- torch.compile vs eager of every compact model timed in both (aim: compile never slower), and
             what torch.compile runs: the ops of the graph AOT autograd hands to inductor, dense vs compact;
* latency -- `--target latency` rows with a latency table per mode (`vitcc profile ... -o TABLE.json`,
             `vitcc compile --target latency --latency-table TABLE.json`), the measured cut against the goal,
             with `--target macs` at the same goal beside it.

All timings: vitcc.cli.bench.run_bench (CUDA events on a GPU, perf_counter on the CPU), models interleaved in
one process, medians; `--dtype bf16` casts weights and inputs (as served, and as the latency tables time
them). Models are compiled on `--device`; where that
fails, on the CPU and moved (the error is recorded).

Usage:  python benchmarks/gpu.py [--device cuda] [--dtype bf16] [--quick] [--budget 400] [--models deit_s,vit_b,swin_t]
        python benchmarks/gpu.py --device cpu --quick      # a smoke test: 2 blocks per model, small batches
Writes benchmarks/results/gpu.md and gpu.json (see --out), after every section, with the command that made them;
the latency rows keep their tables and each compile's report (the selection) in gpu_latency/, so that what a
table predicted can be checked again on any machine with a later vitcc.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import timm
import torch

import vitcc
from vitcc.cli import run as cli_run
from vitcc.cli.bench import run_bench
from vitcc.deploy.runners import DTYPES
from vitcc.deploy.timing import flush_subnormals_in_this_process
from vitcc.devices import exact_float32, resolve_device, to_device
from vitcc.ir.selection import PRUNE_KINDS
from vitcc.metrics import count_params

HERE = Path(__file__).resolve().parent
MODELS = {"deit_s": ("DeiT-S", "deit_small_patch16_224"),
          "vit_b": ("ViT-B", "vit_base_patch16_224"),
          "swin_t": ("Swin-T", "swin_tiny_patch4_window7_224")}
MODE_LABEL = {"eager": "eager", "cudagraph": "CUDA graph", "compile": "torch.compile"}
# seconds `vitcc profile -o` is budgeted at for DeiT-S on a GPU before any row has run (torch.compile compiles
# every unit it times), and each model's table against DeiT-S's: its distinct units and its run time (on the 2-core
# CPU at batch 1, Swin-T's 11 units took 2.7x DeiT-S's 2; ViT-B runs ~4x DeiT-S's MACs through the same 2)
PROFILE_COST = {"eager": 110.0, "cudagraph": 110.0, "compile": 360.0}
MODEL_TABLE_COST = {"deit_s": 1.0, "vit_b": 2.0, "swin_t": 2.5}
# seconds a latency row is budgeted at per `vitcc compile` of it (DeiT-S: 13-17 s on the 2-core CPU, both searches)
ROW_COMPILE_COST = 20.0
# what the latency rows (both searches) may prune: every width kind and whole residual branches
LATENCY_PRUNE = ",".join(k for k in PRUNE_KINDS if k != "other")


class Budget:
    """Wall-clock seconds for the whole run: a section or step that would not fit is skipped, not started."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def allows(self, estimate: float) -> bool:
        return self.left() > estimate


# modes whose tables cost alike: eager and CUDA graph rows run and time the same grid points (a graph capture
# takes milliseconds), torch.compile rows compile every unit they time
COST_FAMILY = {"eager": "runs", "cudagraph": "runs", "compile": "compiles"}


class RowCost:
    """Seconds a latency row is budgeted at: a prior per model and mode, scaled by what this device's rows of that
    cost family took against theirs (the median ratio), so the first row budgets the others: a row that would not
    fit is not started, and one that fits is not skipped. Not across families: what a table costs without
    compiling says little of one that compiles (on the 2-core CPU at batch 8, DeiT-S's eager table took 8x its
    prior, its torch.compile table 2.7x, compilations dominating)."""

    def __init__(self, args, seen: list[dict] = ()):
        self.args = args
        self.ratios = [(COST_FAMILY[r["mode"]], r["seconds"] / r["prior_s"]) for r in seen
                       if r.get("prior_s") and "seconds" in r]

    def prior(self, key: str, mode: str) -> float:
        a, n = self.args, 1 + len(self.args.sparsity_list)  # the table's, and each compile (and one spare)
        table = PROFILE_COST[mode] * MODEL_TABLE_COST[key] * (0.5 if a.dev.type == "cpu" else 1)
        return table + ROW_COMPILE_COST * n + (a.compile_cost * n if mode == "compile" else 20)

    def __call__(self, key: str, mode: str) -> float:
        alike = [r for family, r in self.ratios if family == COST_FAMILY[mode]]
        return self.prior(key, mode) * (statistics.median(alike) if alike else 1.0)

    def record(self, row: dict, key: str, mode: str, seconds: float) -> None:
        """A row that ran to its end (one that failed early says nothing of what a row costs)."""
        if "error" not in row:
            row.update(seconds=round(seconds, 1), prior_s=round(self.prior(key, mode), 1))
            self.ratios.append((COST_FAMILY[mode], seconds / row["prior_s"]))


def _err(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


def _free() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make(name: str, args, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {"depth": args.depth} if args.depth else {}
    if args.depth and "swin" in name:
        kw = {"depths": (2, 2, args.depth, 2)}
    return timm.create_model(name, pretrained=False, **kw).eval()


def example(model: torch.nn.Module, device: torch.device) -> tuple:
    return (torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0)).to(device),)


def compile_on(model, x, device, record: dict, **kw) -> torch.nn.Module:
    """vitcc.compile on the device; where that fails, on the CPU and moved (the error recorded)."""
    t0 = time.perf_counter()
    try:
        r = vitcc.compile(model, "magnitude", example_inputs=x, **kw)
        record.update(compiled_on=str(device))
    except Exception as e:  # noqa: BLE001 - recorded; the timings still come from a CPU compile
        record.update(device_compile_error=_err(e), compiled_on="cpu")
        try:
            r = vitcc.compile(model.to("cpu"), "magnitude", example_inputs=tuple(t.cpu() for t in x), **kw)
            to_device(r.module, device)
        finally:  # the dense model goes back whatever happens: the next variants compile where it is
            model.to(device)
    record.update(compile_s=round(time.perf_counter() - t0, 2), max_abs_error=r.report.get("max_abs_error"),
                  macs_kept=r.report["macs_after"] / r.report["macs_before"],
                  params_kept=r.report["params_after"] / r.report["params_before"],
                  widths={k: v["after"] for k, v in r.report["widths"].items()})
    return r.module.eval()


def bench(models: dict, x: tuple, mode: str, batch: int, args, rounds: int | None = None) -> dict:
    """run_bench for one (mode, batch): medians and, for every model after the first, speed-up and efficiency."""
    res = run_bench(models, x, batches=[batch], runtimes=["eager"], threads=1, rounds=rounds or args.rounds,
                    warmup=args.warmup, device=args.dev, dtype=DTYPES[args.dtype], modes=[mode],
                    compile_mode=args.compile_mode)
    r = res["runs"][0]
    return {"mode": mode, "batch": batch, "ms": {n: s["wall"] for n, s in r["stats"].items()},
            "iqr": {n: s.get("wall_iqr") for n, s in r["stats"].items()}, "compare": r.get("compare", {}),
            "macs": {n: s["macs"] for n, s in res["sizes"].items()}}


def modes_for(args) -> list[tuple[str, int]]:
    """(mode, batch) rows: eager at the large batch, a CUDA graph at batch 1 (GPU only), compile at the large batch."""
    rows = [("eager", args.large)]
    if args.dev.type == "cuda":
        rows.append(("cudagraph", 1))
    rows.append(("compile", args.large))
    return rows


# ------------------------------------------------------------------------------------------- sections

def device_section(args, budget) -> dict:
    """The pipeline with the model on the device: verified, returned there, saved and read back on the CPU."""
    m = make("deit_tiny_patch16_224", argparse.Namespace(depth=2)).to(args.dev)
    x = example(m, args.dev)
    r = vitcc.compile(m, "magnitude", sparsity=0.5, target="macs", align=16, example_inputs=x)
    out = {"device": r.report["device"], "max_abs_error": r.report["max_abs_error"],
           "module_on": sorted({str(t.device) for t in r.module.state_dict().values()}),
           "sdpa_ops": sum(str(n.target) == "aten.scaled_dot_product_attention.default" for n in r.module.graph.nodes)}
    with tempfile.TemporaryDirectory() as tmp:
        vitcc.save(r.module, Path(tmp) / "small.pt2")
        back = vitcc.load(Path(tmp) / "small.pt2")
        with torch.no_grad(), exact_float32():  # TF32 off: the difference is the round trip's, not TF32's
            err = (back(x[0].cpu()) - r.module(x[0]).cpu()).abs().max().item()
    out.update(saved_on=sorted({str(t.device) for t in back.state_dict().values()}), reload_max_abs_error=err)
    return out


def native_section(args, budget, results: dict) -> dict:
    """DeiT-S at half its residual width, heads and MLP is DeiT-Tiny's shape: vitcc's program vs timm's model."""
    dense = make("deit_small_patch16_224", args).to(args.dev)
    x = example(dense, args.dev)
    info: dict = {}
    compact = compile_on(dense, x, args.dev, info, sparsity=0.5, prune="residual,heads,mlp", align=1)
    native = make("deit_tiny_patch16_224", args, seed=1).to(args.dev)
    shapes = {"compact": info["widths"], "native": {"residual": native.embed_dim,
                                                    "heads": sum(b.attn.num_heads for b in native.blocks),
                                                    "mlp": sum(b.mlp.fc1.out_features for b in native.blocks)}}
    same = (shapes["compact"].get("residual") == shapes["native"]["residual"]
            and shapes["compact"].get("heads") == shapes["native"]["heads"]
            and shapes["compact"].get("mlp") == shapes["native"]["mlp"])
    out = {"compile": info, "shapes": shapes, "same_shape": same,
           "params": {"compact": count_params(compact), "native": count_params(native)},
           "rows": []}
    results["native"] = out
    del dense
    for mode, batch in modes_for(args):
        if mode == "compile" and not budget.allows(args.compile_cost * 2 + 30):
            out["rows"].append({"mode": mode, "batch": batch, "skipped": "over the time budget"})
            continue
        try:
            row = bench({"native": native, "compact": compact}, x, mode, batch, args)
            row["compact_over_native"] = row["ms"]["compact"] / row["ms"]["native"]
            out["rows"].append(row)
        except Exception as e:  # noqa: BLE001
            out["rows"].append({"mode": mode, "batch": batch, "error": _err(e)})
        args.save()
        _free()
    return out


def speedups_section(args, budget, results: dict) -> dict:
    """Per model: dense and `--target macs` compacts at each sparsity, interleaved, in each mode."""
    out = {}
    for key in args.model_keys:
        label, name = MODELS[key]
        entry = out[key] = {"label": label, "variants": {}, "rows": []}
        results["speedups"] = out
        if not budget.allows(args.compile_cost + 20):  # room for its vitcc compiles and eager rows at least
            entry["skipped"] = f"over the time budget ({budget.left():.0f} s left)"
            continue
        try:
            dense = make(name, args).to(args.dev)
            x = example(dense, args.dev)
            models = {"dense": dense}
            for s in args.sparsity_list:
                v = f"macs{int(round(s * 100))}"
                info = entry["variants"][v] = {"sparsity": s}
                try:
                    models[v] = compile_on(dense, x, args.dev, info, sparsity=s, target="macs", align=args.align)
                except Exception as e:  # noqa: BLE001
                    info["error"] = _err(e)
                args.save()
            for mode, batch in modes_for(args):
                if mode != "compile":
                    entry["rows"].append(_bench_row(models, x, mode, batch, args))
                    args.save()
                    continue
                # torch.compile costs a compilation per model: 50% first, the others as time allows
                first = [v for v in models if v in ("dense", "macs50")] or list(models)[:2]
                rest = [v for v in models if v not in first]
                for names in (first, rest):
                    if not names:
                        continue
                    need = args.compile_cost * len(names) + 20
                    if not budget.allows(need):
                        entry["rows"].append({"mode": mode, "batch": batch, "models": names,
                                              "skipped": f"over the time budget (~{need:.0f} s needed, "
                                                         f"{budget.left():.0f} s left)"})
                        continue
                    sub = {n: models[n] for n in (["dense"] if "dense" not in names else []) + names}
                    entry["rows"].append(_bench_row(sub, x, mode, batch, args))
                    args.save()
        except Exception as e:  # noqa: BLE001
            entry["error"] = _err(e)
            entry["traceback"] = traceback.format_exc(limit=6)
        finally:
            models = dense = None
            _free()
    return out


def _bench_row(models, x, mode, batch, args) -> dict:
    try:
        t0 = time.perf_counter()
        row = bench(models, x, mode, batch, args)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    except Exception as e:  # noqa: BLE001
        return {"mode": mode, "batch": batch, "models": list(models), "error": _err(e)}
    finally:
        torch._dynamo.reset()


def compile_section(args, budget, results: dict) -> dict:
    """torch.compile vs eager for every model timed in both; and the ops torch.compile hands to inductor."""
    out = {"rows": []}
    for key, entry in (results.get("speedups") or {}).items():
        if not isinstance(entry, dict) or "label" not in entry:
            continue
        eager = {n: ms for r in entry.get("rows", []) if r.get("mode") == "eager" and "ms" in r for n, ms in r["ms"].items()}
        comp = {n: ms for r in entry.get("rows", []) if r.get("mode") == "compile" and "ms" in r for n, ms in r["ms"].items()}
        for n in comp:
            if n in eager:
                out["rows"].append({"model": entry["label"], "variant": n, "eager_ms": eager[n], "compile_ms": comp[n],
                                    "compile_over_eager": comp[n] / eager[n]})
    if budget.allows(25):  # one vitcc compile and two AOT traces, no code generation
        try:
            out["graphs"] = graph_ops(args)
        except Exception as e:  # noqa: BLE001
            out["graphs"] = {"error": _err(e)}
    else:
        out["graphs"] = {"skipped": "over the time budget"}
    return out


def graph_ops(args) -> dict:
    """The aten ops of the graph torch.compile lowers (AOT autograd's forward, inductor's decompositions), dense
    vs compact DeiT-S at 50% of MACs, at the large batch under the run's dtype: the compact graph should run
    the fused attention and the same ops as the dense one."""
    from collections import Counter

    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from vitcc.deploy.runners import as_dtype
    from vitcc.deploy.timing import with_batch

    dense = make("deit_small_patch16_224", args).to(args.dev)
    x = example(dense, args.dev)
    compact = compile_on(dense, x, args.dev, {}, sparsity=0.5, target="macs", align=args.align)
    counts = {}
    for tag, m in (("dense", dense), ("compact", compact)):
        seen: Counter = Counter()

        def fw(gm, inputs, seen=seen):
            seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=fw, decompositions=select_decomp_table())
        cast, xs = as_dtype(m, with_batch(x, args.large), DTYPES[args.dtype])
        with torch.inference_mode():
            torch.compile(cast, backend=backend, dynamic=False)(*xs)
        counts[tag] = dict(seen.most_common())
    _free()
    attention = {t: {k: v for k, v in c.items() if "attention" in k or "softmax" in k} for t, c in counts.items()}
    only = {t: sorted(set(counts[t]) - set(counts[o])) for t, o in (("dense", "compact"), ("compact", "dense"))}
    return {"ops": counts, "attention": attention, "only_in": only,
            "same_ops": not only["dense"] and not only["compact"],
            "total": {t: sum(c.values()) for t, c in counts.items()}}


def latency_available() -> bool:
    """Whether this vitcc's CLI has the latency tables (`compile --latency-table`, `profile -o`): read off the
    command's parameters, not its help text (which a narrow terminal wraps)."""
    import typer.main
    from vitcc.cli.app import app
    command = typer.main.get_command(app).commands["compile"]
    return any("--latency-table" in p.opts for p in command.params)


def latency_order(args) -> list[tuple[str, str, int]]:
    """(model, mode, batch) in the order the rows run: the first model in every mode (each mode's path is
    exercised early), then the others mode by mode."""
    first, others = args.model_keys[0], args.model_keys[1:]
    modes = modes_for(args)
    return [(first, m, b) for m, b in modes] + [(k, m, b) for m, b in modes for k in others]


def latency_rows(args, budget, results: dict) -> dict:
    """`--target latency` at each sparsity with a table per mode, through the CLI as a user runs it. Per model and
    (mode, batch): `vitcc profile MODEL --device D --dtype T --batch B --mode M -o TABLE`, then `vitcc compile
    MODEL --target latency --sparsity S --latency-table TABLE -o OUT`, then the measured cut (dense vs compact in
    that mode) against the goal S, with the MACs and parameters kept, and `--target macs` at S timed beside it
    (eager and CUDA graph rows). Both searches may remove whole branches (`LATENCY_PRUNE`): at batch 1 on a GPU
    narrowing alone cannot reach most goals. Rows are written as they finish (`args.save`)."""
    if not latency_available():
        return {"skipped": "vitcc compile has no --latency-table yet (the latency tables of issue 20): "
                           "these rows run once it does"}
    out: dict = {"prune": LATENCY_PRUNE, "rows": []}
    results["latency"] = out
    cost = RowCost(args, args.seen_rows)
    with tempfile.TemporaryDirectory() as tmp:
        for key, mode, batch in latency_order(args):
            label = MODELS[key][0]
            need = cost(key, mode)
            if not budget.allows(need):
                row = {"skipped": f"over the time budget (~{need:.0f} s needed, {budget.left():.0f} s left)"}
            else:
                t0 = time.perf_counter()
                try:
                    row = latency_row(args, key, mode, batch, Path(tmp))
                except Exception as e:  # noqa: BLE001 - recorded, the next row runs
                    row = {"error": _err(e), "traceback": traceback.format_exc(limit=8)}
                _free()
                cost.record(row, key, mode, time.perf_counter() - t0)
            out["rows"].append({"model": label, "mode": mode, "batch": batch, **row})
            args.save()
    return out


def latency_row(args, key: str, mode: str, batch: int, tmp: Path) -> dict:
    """One model in one mode: its table profiled, then each sparsity compiled against it and timed."""
    label, name = MODELS[key]
    spec = f"timm:{name}"
    if args.depth:  # the CLI builds timm: models as they are: hand it the model with fewer blocks
        spec = str(tmp / f"{key}.pt")
        torch.save(make(name, args), spec)
    kept = args.latency_dir  # the tables and the reports (each selection) stay: results to replay on any machine
    kept.mkdir(parents=True, exist_ok=True)
    table = kept / f"{key}-{mode}-b{batch}.table.json"
    t0 = time.perf_counter()
    threads = ["--threads", "1"] if args.dev.type == "cpu" else []  # as `bench` times it on the CPU
    code = cli_run(["profile", spec, "--device", str(args.dev), "--dtype", args.dtype, "--batch", str(batch),
                    "--mode", mode, "--points", str(args.points), "--repeats", "1", *threads, "-o", str(table)])
    # (one pass: the minutes go to more rows; the second pass is what a shared CPU needs)
    if code != 0:
        return {"error": f"vitcc profile exited {code}"}
    profile_s = round(time.perf_counter() - t0, 1)
    dense = make(name, args).to(args.dev)
    x = example(dense, args.dev)
    models = {"dense": dense}
    infos = {}
    for s in args.sparsity_list:
        path = tmp / f"{key}-{mode}-{s}.pt2"
        report = kept / f"{key}-{mode}-b{batch}-{s}.report.json"
        code = cli_run(["compile", spec, "--target", "latency", "--sparsity", str(s), "--latency-table", str(table),
                        "--prune", LATENCY_PRUNE, "--align", str(args.align), "-o", str(path), "--device",
                        str(args.dev), "--report", str(report)])
        if code != 0:
            infos[s] = {"error": f"vitcc compile exited {code}"}
            continue
        v = f"lat{int(round(s * 100))}"
        models[v] = vitcc.load(path, device=args.dev).eval()
        infos[s] = {"variant": v, "params_kept": count_params(models[v]) / count_params(dense),
                    "predicted_cut": json.loads(report.read_text())["latency_model"]["predicted_reduction"]}
        if mode != "compile":  # `--target macs` at the same goal, timed beside it (compile: time)
            mv = f"macs{int(round(s * 100))}"
            rec: dict = {}
            models[mv] = compile_on(dense, x, args.dev, rec, sparsity=s, target="macs", align=args.align,
                                    prune=LATENCY_PRUNE)
            infos[s]["macs_variant"] = {"variant": mv, "params_kept": rec["params_kept"]}
    row = _bench_row(models, x, mode, batch, args)
    for s, info in infos.items():
        for rec in (info, info.get("macs_variant")):
            v = (rec or {}).get("variant")
            if v and "ms" in row and v in row["ms"]:
                rec.update(measured_cut=1 - row["ms"][v] / row["ms"]["dense"],
                           macs_kept=row["macs"][v] / row["macs"]["dense"])
        if "measured_cut" in info:
            info.update(goal=s, within_5_points=abs(info["measured_cut"] - s) <= 0.05)
    same_latency(infos)
    return {"targets": infos, "timing": row, "profile_s": profile_s}


def same_latency(infos: dict) -> None:
    """Each latency row against `--target macs` at the same measured cut: the MACs and parameters the MACs search
    keeps there, read off the line through its measured points (dense: no cut, everything kept; nothing read
    beyond the last point), and whether the latency search keeps more of both."""
    curve = sorted([(0.0, 1.0, 1.0)] + [(mv["measured_cut"], mv["macs_kept"], mv["params_kept"])
                                        for mv in (i.get("macs_variant") or {} for i in infos.values())
                                        if "measured_cut" in mv])
    for info in infos.values():
        cut = info.get("measured_cut")
        if cut is None or len(curve) < 2 or not curve[0][0] <= cut <= curve[-1][0]:
            continue
        cuts = [c[0] for c in curve]
        macs, params = (float(np.interp(cut, cuts, [c[k] for c in curve])) for k in (1, 2))
        info["macs_search_at_same_cut"] = {"macs_kept": macs, "params_kept": params,
                                           "latency_keeps_more": info["macs_kept"] >= macs and info["params_kept"] >= params}


# ------------------------------------------------------------------------------------------- report

def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _cell(row: dict | None, name: str) -> str:
    if row is None:
        return ""
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    c = row.get("compare", {}).get(name)
    if not c or "speedup" not in c:
        return ""
    return f"{c['speedup']:.2f}x ({c['efficiency']:.0%})"


def render(data: dict) -> str:
    a = data["args"]
    where = "a GPU" if a["device"].startswith("cuda") else "the CPU (the GPU benchmark's sections, run there)"
    lines = [f"# vitcc on {where}: dense vs compact (benchmarks/gpu.py)", "",
             f"Command: `{data['command']}`", "",
             f"{data['date']}; {data['machine']}; dtype {a['dtype']}"
             f"{' (weights and inputs cast)' if a['dtype'] != 'fp32' else ''}; torch.compile mode {a['compile_mode']}; "
             f"large batch {a['large']}; {data['seconds']:.0f} s of a {a['budget']:.0f} s budget"
             + ("; **quick run** (fewer rounds" + (f", {a['depth']} blocks per model" if a["depth"] else "") + ")"
                if a["quick"] else ""), "",
             "Timings: vitcc.cli.bench.run_bench, dense and compact interleaved in one process, medians "
             f"({'CUDA events' if a['device'].startswith('cuda') else 'wall clock'}). Efficiency = speed-up / MAC "
             "ratio (the ideal). Random weights.", ""]
    dev = data["sections"].get("device") or {"skipped": "not run (--sections)"}
    lines += ["## The pipeline on the device", ""]
    if isinstance(dev, dict) and "error" not in dev and "skipped" not in dev:
        lines += [f"`vitcc.compile` with the model on {dev['device']}: verified (max |compact - masked| "
                  f"{dev['max_abs_error']:.2g} in float32, TF32 off), compact model on {', '.join(dev['module_on'])}, "
                  f"{dev['sdpa_ops']} fused attention ops kept; saved and read back on {', '.join(dev['saved_on'])} "
                  f"(max difference {dev['reload_max_abs_error']:.2g}).", ""]
    else:
        lines += [_not_done(dev), ""]

    nat = data["sections"].get("native") or {"skipped": "not run (--sections)"}
    lines += ["## The compact program vs a native model of its shape", "",
              "DeiT-S pruned to half its residual width, heads and MLP (head dims kept) has DeiT-Tiny's shape; "
              "timm's DeiT-Tiny beside it. Aim: within 3%.", ""]
    if isinstance(nat, dict) and "rows" in nat:
        lines += [f"Same shape: {'yes' if nat['same_shape'] else 'NO'} ({nat['shapes']}); parameters "
                  f"{nat['params']['compact']:,} vs {nat['params']['native']:,}.", "",
                  "| mode | batch | compact | native | compact / native | within 3% |", "| --- | --- | --- | --- | --- | --- |"]
        for r in nat["rows"]:
            if "ms" in r:
                q = r["compact_over_native"]
                lines.append(f"| {MODE_LABEL[r['mode']]} | {r['batch']} | {r['ms']['compact']:.3f} ms | "
                             f"{r['ms']['native']:.3f} ms | {q:.3f} | {'yes' if q <= 1.03 else '**no**'} |")
            else:
                lines.append(f"| {MODE_LABEL[r['mode']]} | {r['batch']} | {r.get('skipped') or r.get('error')} | | | |")
        lines.append("")
    else:
        lines += [_not_done(nat), ""]

    sp = data["sections"].get("speedups") or {}
    lines += ["## Speed-up of the compact model (`--target macs`, `--align 16`)", "",
              "Cells: speed-up over dense (efficiency).", ""]
    if isinstance(sp, dict) and "error" in sp and not any(isinstance(v, dict) and "label" in v for v in sp.values()):
        lines += [f"Failed: {sp['error']}", ""]
    else:
        rowspecs = [(m, b) for m, b in (("eager", a["large"]), ("cudagraph", 1), ("compile", a["large"]))
                    if m != "cudagraph" or a["device"].startswith("cuda")]
        head = " | ".join(f"{MODE_LABEL[m]} b{b}" for m, b in rowspecs)
        lines += [f"| model, variant | MACs kept | params kept | {head} |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in rowspecs) + " |"]
        for key, entry in sp.items():
            if not isinstance(entry, dict) or "label" not in entry:
                continue
            if "skipped" in entry or ("error" in entry and not entry.get("rows")):
                lines.append(f"| {entry['label']} | {entry.get('skipped') or entry.get('error')} | | "
                             + " | ".join("" for _ in rowspecs) + " |")
                continue
            for v, info in entry["variants"].items():
                if "error" in info and "macs_kept" not in info:
                    lines.append(f"| {entry['label']} {v} | error: {info['error']} | | " + " | ".join("" for _ in rowspecs) + " |")
                    continue
                cells = []
                for m, b in rowspecs:
                    found = [r for r in entry["rows"] if r.get("mode") == m and r.get("batch") == b
                             and (v in r.get("ms", {}) or v in r.get("models", []))]
                    cells.append(_cell(found[0], v) if found else "")
                lines.append(f"| {entry['label']} {v} | {info['macs_kept']:.0%} | {info['params_kept']:.0%} | "
                             + " | ".join(cells) + " |")
            dense = []
            for m, b in rowspecs:
                ms = next((r["ms"]["dense"] for r in entry["rows"] if r.get("mode") == m and r.get("batch") == b
                           and "dense" in r.get("ms", {})), None)
                dense.append("" if ms is None else f"{ms:.3f} ms")
            lines.append(f"| {entry['label']} dense | 100% | 100% | " + " | ".join(dense) + " |")
        lines.append("")
        notes = [f"{e['label']} {r['mode']} b{r['batch']} ({', '.join(r.get('models', []))}): {r.get('skipped') or r.get('error')}"
                 for e in sp.values() if isinstance(e, dict) for r in e.get("rows", []) if "skipped" in r or "error" in r]
        notes += [f"{e['label']} {v}: compiled on the CPU, device compile failed: {i['device_compile_error']}"
                  for e in sp.values() if isinstance(e, dict) for v, i in e.get("variants", {}).items()
                  if "device_compile_error" in i]
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]

    cp = data["sections"].get("compile") or {}
    lines += ["## torch.compile vs eager", "", f"Every model timed in both modes at batch {a['large']}. Aim: the "
              "compact model under torch.compile is never slower than in eager mode.", ""]
    if cp.get("rows"):
        lines += ["| model, variant | eager | torch.compile | compile / eager | never slower |", "| --- | --- | --- | --- | --- |"]
        for r in cp["rows"]:
            q = r["compile_over_eager"]
            lines.append(f"| {r['model']} {r['variant']} | {r['eager_ms']:.3f} ms | {r['compile_ms']:.3f} ms | "
                         f"{q:.3f} | {'yes' if q <= 1.0 else '**no**'} |")
        lines.append("")
    g = cp.get("graphs") or {}
    if "ops" in g:
        lines += [f"What torch.compile lowers (DeiT-S, dense vs compact at 50% of MACs): {g['total']['dense']} vs "
                  f"{g['total']['compact']} ops; same ops: {'yes' if g['same_ops'] else 'no'}; attention: "
                  f"dense {g['attention']['dense']}, compact {g['attention']['compact']}"
                  + (f"; only in dense: {g['only_in']['dense']}, only in compact: {g['only_in']['compact']}"
                     if not g["same_ops"] else "") + ".", ""]
    elif g:
        lines += [f"Graph check: {g.get('skipped') or g.get('error')}", ""]

    lat = data["sections"].get("latency") or {"skipped": "not run (--sections)"}
    lines += ["## `--target latency` with a table per mode", ""]
    if "rows" in lat:
        lines += ["Measured cut = 1 - compact / dense latency in that mode; predicted = the table's prediction "
                  "(the compile report's `latency_model`). `--target macs` at the same goal timed beside it (not in "
                  "torch.compile rows); **at the same cut**: what the MACs search keeps at the latency row's measured "
                  "cut, on the line through its measured points (aim: the latency search keeps more MACs and "
                  f"parameters). Both searches prune `{lat.get('prune', 'the default kinds')}`.", "",
                  "| model | mode | batch | goal | predicted | measured cut | within 5 points | MACs kept | params kept | "
                  "`--target macs`: cut, MACs kept, params kept | `--target macs` at the same cut: MACs, params | "
                  "latency keeps more |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in lat["rows"]:
            if "targets" not in r:
                lines.append(f"| {r['model']} | {MODE_LABEL.get(r['mode'], r['mode'])} | {r.get('batch', '')} | "
                             f"{r.get('skipped') or r.get('error')} |" + " |" * 8)
                continue
            for s, info in r["targets"].items():
                if "measured_cut" in info:
                    mv = info.get("macs_variant") or {}
                    macs = (f"{mv['measured_cut']:.0%}, {mv['macs_kept']:.0%}, {mv['params_kept']:.0%}"
                            if "measured_cut" in mv else "")
                    same = info.get("macs_search_at_same_cut")
                    at_cut = f"{same['macs_kept']:.0%}, {same['params_kept']:.0%}" if same else ""
                    verdict = ("yes" if same["latency_keeps_more"] else "**no**") if same else ""
                    lines.append(f"| {r['model']} | {MODE_LABEL[r['mode']]} | {r['batch']} | {float(s):.0%} | "
                                 f"{info['predicted_cut']:.0%} | {info['measured_cut']:.0%} | "
                                 f"{'yes' if info['within_5_points'] else '**no**'} | "
                                 f"{info['macs_kept']:.0%} | {info['params_kept']:.0%} | {macs} | {at_cut} | {verdict} |")
                else:
                    lines.append(f"| {r['model']} | {MODE_LABEL[r['mode']]} | {r['batch']} | {float(s):.0%} | "
                                 f"{info.get('error', '')} |" + " |" * 7)
        lines.append("")
    else:
        lines += [f"Skipped: {lat.get('skipped') or lat.get('error')}", ""]

    errors = [(k, v) for k, v in data["sections"].items() if isinstance(v, dict) and "error" in v]
    skipped = [(k, v["skipped"]) for k, v in data["sections"].items() if isinstance(v, dict) and "skipped" in v]
    if errors or skipped:
        lines += ["## Errors and skips", ""] + [f"- {k}: {v['error']}" for k, v in errors] + \
                 [f"- {k}: skipped, {why}" for k, why in skipped] + [""]
    return "\n".join(lines)


def _not_done(section) -> str:
    """The line for a section that did not run to the end: why it was skipped, or the error it stopped at."""
    if isinstance(section, dict) and "error" not in section:
        return f"Skipped: {section.get('skipped')}"
    return f"Failed: {section.get('error') if isinstance(section, dict) else section}"


def machine(dev: torch.device) -> str:
    gpu = f"{torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}, " if dev.type == "cuda" else ""
    commit = os.environ.get("VITCC_COMMIT", "")  # set by device_run.sh's caller: a copied tree has no .git
    try:
        commit = commit or subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return (f"{gpu}{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), "
            f"torch {torch.__version__}, timm {timm.__version__}, vitcc {vitcc.__version__}"
            + (f" at {commit}" if commit else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--models", default="deit_s,vit_b,swin_t", help=f"comma-separated from {', '.join(MODELS)}")
    ap.add_argument("--sparsities", default="0.25,0.5,0.75", help="fractions of MACs to remove")
    ap.add_argument("--align", type=int, default=16)
    ap.add_argument("--large", type=int, default=None, help="the large batch (default 256; --quick: 64 on a GPU, 4 on the CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20; --quick 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--compile-cost", type=float, default=None, help="seconds one torch.compile is budgeted at "
                    "(default 35 on a GPU, 12 on the CPU)")
    ap.add_argument("--depth", type=int, default=None, help="blocks per model (Swin: of its third stage); "
                    "default: as built, --quick on the CPU: 2")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 400; --quick "
                    "on the CPU 100): what would not fit is skipped")
    ap.add_argument("--points", type=int, default=None, help="latency rows: widths timed per kind by vitcc "
                    "profile -o (default 16; --quick 4)")
    ap.add_argument("--sections", default="device,native,speedups,compile,latency")
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, 50%%, few rounds")
    ap.add_argument("--costs-from", default=None, help="a JSON this script wrote on this device: its latency rows' "
                    "times budget this run's rows (a second call on a warm machine)")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"), help="writes OUT.md, OUT.json and OUT_latency/")
    args = ap.parse_args(argv)
    args.dev = resolve_device(args.device)
    cpu = args.dev.type == "cpu"
    if args.quick:
        args.models = "deit_s" if args.models == ap.get_default("models") else args.models
        args.sparsities = "0.5" if args.sparsities == ap.get_default("sparsities") else args.sparsities
    args.large = args.large or (256 if not args.quick else 4 if cpu else 64)
    args.rounds = args.rounds or (5 if args.quick else 20)
    args.points = args.points or (4 if args.quick else 16)
    args.depth = args.depth or (2 if args.quick and cpu else None)
    args.compile_cost = args.compile_cost or (12.0 if cpu else 35.0)
    if args.budget is None:
        args.budget = 100.0 if args.quick and cpu else 400.0
    if cpu and args.dtype == "fp16":
        ap.error("--dtype fp16 runs on a GPU; on the CPU use fp32 or bf16")
    args.model_keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = set(args.model_keys) - set(MODELS)
    if unknown:
        ap.error(f"unknown --models {sorted(unknown)}; use {', '.join(MODELS)}")
    args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    budget = Budget(args.budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix()), *(argv or sys.argv[1:])]),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(args.dev),
            "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
            "sections": {}, "seconds": 0.0}
    data["args"]["device"] = str(args.dev)
    args.latency_dir = out.with_name(out.name + "_latency")
    args.seen_rows = (json.loads(Path(args.costs_from).read_text()).get("sections", {}).get("latency", {}).get("rows", [])
                      if args.costs_from and Path(args.costs_from).exists() else [])
    args.save = lambda: _write(out, data, budget)  # sections with rows save as each row lands: a kill loses that row
    order = [s.strip() for s in args.sections.split(",") if s.strip()]
    runners = {"device": lambda: device_section(args, budget),
               "native": lambda: native_section(args, budget, data["sections"]),
               "speedups": lambda: speedups_section(args, budget, data["sections"]),
               "compile": lambda: compile_section(args, budget, data["sections"]),
               "latency": lambda: latency_rows(args, budget, data["sections"])}
    for name in order:
        t0 = time.perf_counter()
        print(f"[{budget.used():6.1f} s] {name}", flush=True)
        if name not in runners:
            data["sections"][name] = {"error": f"unknown section {name!r}"}
        elif not budget.allows(20):
            data["sections"][name] = {"skipped": f"over the time budget ({budget.left():.0f} s left)"}
        else:
            try:
                data["sections"][name] = runners[name]()
            except Exception as e:  # noqa: BLE001 - recorded, the next section runs
                data["sections"][name] = {"error": _err(e), "traceback": traceback.format_exc(limit=8)}
            try:
                _free()
            except Exception as e:  # noqa: BLE001 - a broken device: the results so far are still written
                data["sections"][name]["free_error"] = _err(e)
        if isinstance(data["sections"][name], dict):
            data["sections"][name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        _write(out, data, budget)
    print(f"[{budget.used():6.1f} s] wrote {out}.md and {out}.json", flush=True)
    return 0


def _write(out: Path, data: dict, budget: Budget) -> None:
    data["seconds"] = budget.used()  # so far: a run killed mid-section still says how long it ran
    Path(f"{out}.json").write_text(json.dumps(data, indent=2, default=str))
    try:
        Path(f"{out}.md").write_text(render(data))
    except Exception as e:  # noqa: BLE001 - the JSON has it all; say why the page is missing
        Path(f"{out}.md").write_text(f"# benchmarks/gpu.py\n\nrendering failed: {_err(e)}\n\n```\n"
                                     f"{traceback.format_exc(limit=6)}```\n")


if __name__ == "__main__":
    flush_subnormals_in_this_process()  # before torch starts a thread, as `vitcc` does
    sys.exit(main())
