"""Deployment latency: dense vs vitcc-compiled (and Torch-Pruning-pruned) ViTs, eager PyTorch and onnxruntime.

For DeiT-S, ViT-B and Swin-T (random weights), at 25%, 50% and 75% of MACs removed
(`vitcc.compile(model, "magnitude", sparsity=s, target="macs", align=A)`), measures on CPU:

* eager PyTorch at batch 1 and 32, and onnxruntime (vitcc.export.export_onnx, verified) at batch 1 and 32;
* every variant of one model is timed in one process, interleaved: each round calls every variant once,
  in a rotating order; figures are medians over rounds of wall-clock time, with process CPU time beside
  it (CPU time leaves out the time the process waited for a core on a shared machine; with one thread
  it is the cleaner figure of what the model costs);
* speed-up = dense / compact, ideal = dense MACs / compact MACs, efficiency = speed-up / ideal;
* Torch-Pruning (if installed) prunes the same model at the ratio that gives vitcc's widths (its timm
  ViT setup, benchmarks/compile_time.py::run_tp), timed beside it;
* `--target latency` at 25% and 50% (the per-op latency model of vitcc.latency, eager, batch 1, filled
  from the cache under $VITCC_CACHE or measured during the compile): the measured latency reduction
  against the requested one;
* an --align sweep on DeiT-S at 50% of MACs (the evidence for the CLI's --align default), and a
  microbenchmark of SDPA and linear latency against width.

Usage:  python benchmarks/latency.py [--quick] [--models deit_s,vit_b,swin_t] [--sections models,latency,align,micro]
                                    [--threads 1] [--merge]
Writes benchmarks/results/latency.md and .json (see --out). `--merge` keeps what is not rerun now from
an earlier run (e.g. `--models swin_t --merge` once Swin compiles, or `--sections latency --merge`).
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
import sys
import tempfile
import time
import traceback
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vitcc  # noqa: E402
from vitcc.export import export_onnx  # noqa: E402
from vitcc.latency import (interleaved, loadavg, machine_info, onnx_feed, onnx_session, summarize,  # noqa: E402
                           time_ratio, with_batch)
from vitcc.metrics import count_macs, count_params  # noqa: E402

try:
    from compile_time import run_tp, tp  # the Torch-Pruning setup for timm ViTs (its own example's)
except Exception:  # pragma: no cover
    run_tp, tp = None, None

MODELS = {"deit_s": ("DeiT-S", "deit_small_patch16_224"),
          "vit_b": ("ViT-B", "vit_base_patch16_224"),
          "swin_t": ("Swin-T", "swin_tiny_patch4_window7_224")}


def _make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def _err(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


# ------------------------------------------------------------------------------------------- variants

def build_variants(name: str, x: torch.Tensor, args) -> tuple[dict, dict]:
    """name -> module, and name -> info (params, MACs, how it was built, errors)."""
    dense = _make(name)
    mods, info = {"dense": dense}, {"dense": {"params": count_params(dense), "macs": count_macs(dense, (x,))}}
    for s in args.sparsities:
        key = f"vitcc-{int(s * 100)}"
        t0 = time.perf_counter()
        try:
            r = vitcc.compile(dense, "magnitude", sparsity=s, target="macs", align=args.align, example_inputs=(x,))
        except Exception as e:
            info[key] = {"error": _err(e), "sparsity": s}
            traceback.print_exc()
            continue
        mods[key] = r.module.eval()
        rep = r.report
        info[key] = {"sparsity": s, "target": "macs", "align": args.align, "params": rep["params_after"],
                     "macs": rep["macs_after"], "widths": rep["widths"], "max_abs_error": rep.get("max_abs_error"),
                     "compile_s": time.perf_counter() - t0}
        print(f"  {key}: MACs kept {rep['macs_after'] / rep['macs_before']:.3f}, widths "
              f"{ {k: v['after'] for k, v in rep['widths'].items()} }, {time.perf_counter() - t0:.1f}s", flush=True)
        if args.tp and run_tp is not None:
            tkey = f"tp-{int(s * 100)}"
            try:
                tmod, tinfo = prune_tp(name, x, rep, info["dense"]["macs"], args)
                mods[tkey], info[tkey] = tmod, tinfo
                print(f"  {tkey}: MACs kept {tinfo['macs'] / info['dense']['macs']:.3f} (ratio "
                      f"{tinfo['pruning_ratio']:.4f})", flush=True)
            except Exception as e:
                info[tkey] = {"error": _err(e), "sparsity": s}
                traceback.print_exc()
    return mods, info


def prune_tp(name: str, x: torch.Tensor, rep: dict, dense_macs: int, args):
    """Torch-Pruning at the ratio that gives vitcc's residual width; one secant step towards vitcc's MACs."""
    import warnings
    goal = rep["macs_after"] / dense_macs
    w = rep["widths"]["residual"]
    ratio = 1 - w["after"] / w["before"]
    tried = []
    for _ in range(3):
        model = _make(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run_tp(model, x, ratio, args.tp_round_to, check=True)
        if not out.get("runs"):
            raise RuntimeError(f"Torch-Pruning's model does not run: {out.get('run_error', 'bad output')}")
        kept = out["macs_after"] / dense_macs
        tried.append((ratio, kept))
        if abs(kept - goal) <= 0.01 or len(tried) == 3:
            break
        if len(tried) == 1:
            ratio = min(0.95, max(0.0, ratio + (kept - goal) * 0.5))
        else:
            (r0, k0), (r1, k1) = tried[-2], tried[-1]
            ratio = r1 + (goal - k1) * (r1 - r0) / (k1 - k0) if k1 != k0 else r1
            ratio = min(0.95, max(0.0, ratio))
    best_ratio, _ = min(tried, key=lambda t: abs(t[1] - goal))
    if best_ratio != ratio:
        model = _make(name)
        out = run_tp(model, x, best_ratio, args.tp_round_to, check=True)
    return model.eval(), {"pruning_ratio": best_ratio, "round_to": args.tp_round_to, "params": out["params_after"],
                          "macs": out["macs_after"], "heads": out.get("heads"), "head_dim": out.get("head_dim"),
                          "embed_dim": out.get("embed_dim"), "mlp_hidden": out.get("mlp_hidden"),
                          "tried": tried}


# -------------------------------------------------------------------------------------------- timing

def rounds_for(batch: int, args) -> int:
    return args.rounds if batch < 8 else args.rounds_large


def time_eager(mods: dict, x: torch.Tensor, batch: int, args, names=None) -> dict:
    names = names or list(mods)
    xs = with_batch((x,), batch)
    fns = {n: (lambda m=mods[n]: m(*xs)) for n in names}
    la0 = loadavg()
    t0 = time.perf_counter()
    samples = interleaved(fns, rounds=rounds_for(batch, args), warmup=args.warmup)
    return {"runtime": "eager", "batch": batch, "stats": summarize(samples), "samples": samples,
            "loadavg": [la0, loadavg()], "seconds": time.perf_counter() - t0}


def export_all(mods: dict, x: torch.Tensor, workdir: Path, info: dict, names) -> dict:
    sessions = {}
    for n in names:
        path = workdir / f"{n}.onnx"
        t0 = time.perf_counter()
        try:
            res = export_onnx(mods[n], (x,), path)
        except Exception as e:
            info[n]["onnx_error"] = _err(e)
            print(f"  onnx export of {n} failed: {_err(e)}", flush=True)
            continue
        info[n]["onnx"] = {**res, "seconds": time.perf_counter() - t0, "nodes": _onnx_ops(path),
                           "ort_optimized_nodes": _ort_optimized_ops(path)}
        sessions[n] = path
    return sessions


def _onnx_ops(path: Path) -> dict:
    import collections

    import onnx
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _ort_optimized_ops(path: Path) -> dict:
    """Op histogram of the graph onnxruntime runs (after its fusions), to spot fusions the compact graph loses."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _onnx_ops(path.with_suffix(".opt.onnx"))


def time_onnx(paths: dict, x: torch.Tensor, batch: int, args) -> dict:
    sessions = {n: onnx_session(p, args.threads) for n, p in paths.items()}
    xs = with_batch((x,), batch)
    fns = {n: (lambda s=s, f=onnx_feed(s, xs): s.run(None, f)) for n, s in sessions.items()}
    la0 = loadavg()
    t0 = time.perf_counter()
    samples = interleaved(fns, rounds=rounds_for(batch, args), warmup=args.warmup)
    del sessions, fns
    return {"runtime": "onnx", "batch": batch, "stats": summarize(samples), "samples": samples,
            "loadavg": [la0, loadavg()], "seconds": time.perf_counter() - t0}


def compare(runs: list, info: dict) -> None:
    """Add speed-up, ideal and efficiency (wall and CPU) against dense to every run."""
    for run in runs:
        st = run["stats"]
        if "dense" not in st:
            continue
        run["compare"] = {}
        for n, s in st.items():
            if n == "dense" or "macs" not in info.get(n, {}):
                continue
            ideal = info["dense"]["macs"] / info[n]["macs"]
            sp, spc = st["dense"]["wall"] / s["wall"], st["dense"]["cpu"] / s["cpu"]
            if "samples" in run:  # median over rounds of the per-round ratio: load swings slower than a
                d, v = run["samples"]["dense"], run["samples"][n]  # round cancel out
                sp = statistics.median(a / b for a, b in zip(d["wall"], v["wall"]))
                spc = statistics.median(a / b for a, b in zip(d["cpu"], v["cpu"]))
            run["compare"][n] = {"speedup": sp, "speedup_cpu": spc, "ideal": ideal, "efficiency": sp / ideal,
                                 "efficiency_cpu": spc / ideal, "reduction": 1 - 1 / sp,
                                 "reduction_cpu": 1 - 1 / spc,
                                 "speedup_of_medians": st["dense"]["wall"] / s["wall"],
                                 "speedup_of_medians_cpu": st["dense"]["cpu"] / s["cpu"]}


def bench_model(key: str, args) -> dict:
    label, name = MODELS[key]
    print(f"== {label} ({name})", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t_start = time.perf_counter()
    out = {"label": label, "model": name, "runs": [], "loadavg_start": loadavg(), "command": _command(),
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    mods, info = build_variants(name, x, args)
    out["variants"] = info
    main = list(mods)
    for b in args.batches:
        print(f"  eager batch {b}: {len(main)} models x {rounds_for(b, args)} rounds", flush=True)
        out["runs"].append(time_eager(mods, x, b, args, main))
        compare(out["runs"][-1:], info)
        _print_run(out["runs"][-1])
    if args.onnx:
        with tempfile.TemporaryDirectory(prefix="vitcc-latency-") as tmp:
            paths = export_all(mods, x, Path(tmp), info, main)
            for b in args.onnx_batches:
                print(f"  onnx batch {b}: {len(paths)} models x {rounds_for(b, args)} rounds", flush=True)
                out["runs"].append(time_onnx(paths, x, b, args))
                compare(out["runs"][-1:], info)
                _print_run(out["runs"][-1])
    out["loadavg_end"] = loadavg()
    out["seconds"] = time.perf_counter() - t_start
    del mods
    gc.collect()
    return out


def _print_run(run: dict) -> None:
    for n, c in run.get("compare", {}).items():
        print(f"    {run['runtime']} b{run['batch']} {n:14s} speed-up {c['speedup']:.2f}x (cpu {c['speedup_cpu']:.2f}x)"
              f" ideal {c['ideal']:.2f}x eff {c['efficiency']:.1%} (cpu {c['efficiency_cpu']:.1%})", flush=True)


# ------------------------------------------------------------------------------------ --target latency

def latency_targets(key: str, args) -> dict:
    """`--target latency` at each requested fraction; dense and compact timed together, eager, batch 1."""
    label, name = MODELS[key]
    print(f"== --target latency: {label} ({name})", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dense = _make(name)
    out = {"label": label, "model": name, "command": _command(), "loadavg_start": loadavg(),
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    mods, info = {"dense": dense}, {"dense": {"params": count_params(dense), "macs": count_macs(dense, (x,))}}
    for s in args.latency_targets:
        k = f"latency-{int(s * 100)}"
        t0 = time.perf_counter()
        try:
            r = vitcc.compile(dense, "magnitude", sparsity=s, target="latency", align=args.align,
                              example_inputs=(x,))
        except Exception as e:
            info[k] = {"error": _err(e), "sparsity": s}
            traceback.print_exc()
            continue
        mods[k] = r.module.eval()
        rep = r.report
        info[k] = {"sparsity": s, "target": "latency", "align": args.align, "params": rep["params_after"],
                   "macs": rep["macs_after"], "widths": rep["widths"], "latency_model": rep["latency_model"],
                   "max_abs_error": rep.get("max_abs_error"), "compile_s": time.perf_counter() - t0}
        print(f"  {k}: predicted reduction {rep['latency_model']['predicted_reduction']:.3f}, MACs kept "
              f"{rep['macs_after'] / rep['macs_before']:.3f}, {rep['latency_model']['ops_measured']} ops measured, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    out["variants"] = info
    out["runs"] = [time_eager(mods, x, 1, args)]
    compare(out["runs"], info)
    _print_run(out["runs"][0])
    out["loadavg_end"] = loadavg()
    return out


# ----------------------------------------------------------------------------------- align sweep, micro

def align_sweep(args) -> dict:
    """DeiT-S at 50% of MACs removed, --align 1, 4, 8, 16, 32: eager b1/b32 and onnxruntime b1."""
    name = MODELS["deit_s"][1]
    print(f"== align sweep ({name}, 50% of MACs)", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dense = _make(name)
    mods, info = {"dense": dense}, {"dense": {"params": count_params(dense), "macs": count_macs(dense, (x,))}}
    for a in args.align_sweep:
        r = vitcc.compile(dense, "magnitude", sparsity=0.5, target="macs", align=a, example_inputs=(x,))
        mods[f"align-{a}"] = r.module.eval()
        info[f"align-{a}"] = {"align": a, "params": r.report["params_after"], "macs": r.report["macs_after"],
                              "widths": r.report["widths"], "max_abs_error": r.report.get("max_abs_error"),
                              "head_dim": _head_dim(r)}
    runs = [time_eager(mods, x, b, args) for b in args.sweep_batches]
    if args.onnx:
        with tempfile.TemporaryDirectory(prefix="vitcc-align-") as tmp:
            paths = export_all(mods, x, Path(tmp), info, list(mods))
            runs.append(time_onnx(paths, x, 1, args))
    compare(runs, info)
    for r in runs:
        _print_run(r)
    return {"variants": info, "runs": runs}


def _head_dim(r) -> int | None:
    g = next((g for g in r.groups if g.name.endswith("qk_dim")), None)
    return len(r.selection.get(g.name, range(g.size))) if g is not None else None


def micro(args) -> dict:
    """SDPA latency against head dim (DeiT-S attention: 6 heads x 197 tokens) and linear against width,
    each relative to the full-width op, CPU time, paired with the full-width op."""
    out = {"sdpa": [], "linear": []}
    with torch.inference_mode():
        q0 = [torch.randn(1, 6, 197, 64) for _ in range(3)]
        full = lambda: F.scaled_dot_product_attention(*q0, scale=0.125)
        for d in range(32, 65, 2):
            q = [torch.randn(1, 6, 197, d) for _ in range(3)]
            r = time_ratio(lambda: F.scaled_dot_product_attention(*q, scale=0.125), full, samples=9, clock="thread")
            out["sdpa"].append({"head_dim": d, "relative": r, "ideal": d / 64})
        q0 = [torch.randn(32, 6, 197, 64) for _ in range(3)]
        full = lambda: F.scaled_dot_product_attention(*q0, scale=0.125)
        out["sdpa_b32"] = []
        for d in (32, 35, 40, 46, 48, 56, 57, 64):
            q = [torch.randn(32, 6, 197, d) for _ in range(3)]
            r = time_ratio(lambda: F.scaled_dot_product_attention(*q, scale=0.125), full, samples=5, clock="thread")
            out["sdpa_b32"].append({"head_dim": d, "relative": r, "ideal": d / 64})
        out["linear_n"] = []
        for m in (197, 32 * 197):  # output width N of a DeiT-S fc2-like GEMM (K = 1104), batch 1 and 32
            x = torch.randn(1, m, 1104)
            w0 = torch.randn(384, 1104)
            full = lambda: F.linear(x, w0)
            for n in (264, 268, 272, 276, 280, 284, 288, 330, 332, 336, 340, 344, 348):
                w = torch.randn(n, 1104)
                r = time_ratio(lambda: F.linear(x, w), full, samples=5, clock="thread")
                out["linear_n"].append({"rows": m, "out": n, "relative": r, "ideal": n / 384})
        x0, w0 = torch.randn(1, 197, 384), torch.randn(1536, 384)
        fullw = lambda: F.linear(x0, w0)
        for k in (256, 264, 268, 270, 272, 276, 280, 288):
            n = 4 * k
            x, w = torch.randn(1, 197, k), torch.randn(n, k)
            r = time_ratio(lambda: F.linear(x, w), fullw, samples=9, clock="thread")
            out["linear"].append({"in": k, "out": n, "relative": r, "ideal": k * n / (384 * 1536)})
    return out


# ------------------------------------------------------------------------------------------- render

FINDINGS = """## What the measurements say (and what changed in vitcc)

1. **Widths that are not multiples of 8 are slow on this CPU**, and that is the one avoidable slowdown
   the compact models had. MKL's sgemm runs a Linear whose output width is not a multiple of 8 up to
   1.5x slower per FLOP once the row count is large (table above: at batch 32, N = 268, 284, 330, 332,
   348 cost 1.5x, 276 and 340 about 1.2x, every multiple of 8 about 1.0x; at batch 1 within 10%). The
   CPU flash-attention kernel behind `F.scaled_dot_product_attention` has the same sawtooth in the head
   dim (46 and 57 are slower than 48 and 56, at batch 1 and 32). Torch-Pruning's models at the same
   MACs show it: at 25% of MACs removed it keeps head dim 57 and widths 342/855/1368 on DeiT-S and is
   no faster than the dense model at batch 32 in eager PyTorch (74% efficiency; vitcc: 100%+).
   vitcc's `--align N` already rounded residual, head-dim and MLP widths (heads stay free: a head
   count times an aligned head dim is aligned); with align 1 DeiT-S at 50% runs at 81% efficiency at
   batch 32, with 8 at 94% (sweep above). So **the CLI default of `vitcc compile --align` is now 8**
   (also `vitcc bench --sparsity` and `vitcc profile`); `vitcc.compile(...)`'s Python default stays 1.
2. **Nothing else in the compact graphs costs time that the dense graph does not.** The compact FX
   graph has the dense graph's op counts (aten-level profiles: one addmm per Linear, one fused
   `_scaled_dot_product_flash_attention_for_cpu` per block, the same copies, no index/gather ops);
   vitcc's rewrite keeps fused SDPA (it passes the original `scale=`). In onnxruntime, the compact
   graphs optimize to the same op histogram as the dense graph (MatMul/FusedMatMul, BiasGelu,
   LayerNormalization, SkipLayerNormalization: see "onnxruntime-optimized graphs" per model), so no
   fusion is lost. No pass change was needed beyond the alignment default.
3. **What remains below the ideal is inherent to pruning by MACs.** GEMMs (about 80% of DeiT-S at
   batch 1) speed up by their MAC ratio. GELU, LayerNorm, the residual adds and the patch
   embedding shrink with the width (linearly), attention's softmax shrinks with the number of heads
   only, and the ideal counts none of them; so the efficiency falls as more is removed (75% of MACs
   removed) and is lowest at batch 1 in eager PyTorch, where those ops weigh most.
4. **`--target latency`** (the per-op latency model, vitcc.latency, eager at the compile's batch) lands
   within a few points of the requested reduction (its table above). It needs no per-model
   code: every linear, attention, norm, softmax and elementwise op of the traced graph is timed at
   its compact shape, relative to the same op at its dense shape timed beside it (thread CPU time;
   the dense ops relative to a reference GEMM), and what is not timed op by op is one constant
   calibrated on the dense model. The search is select's uniform-fraction search on that prediction,
   plus one refinement: where one head fewer per block would overshoot the goal, the heads of the
   largest fraction that falls short are kept and the other kinds searched again ("selection").
5. **Noise.** The machine is shared (see the load averages); wall-clock medians of interleaved runs
   still move by a few points between runs when the load is high, the CPU-time figures much less.
"""

def _pct(v, nd=0):
    return "n/a" if v is None else f"{v * 100:.{nd}f}%"


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def render(data: dict) -> str:
    meta = data["meta"]
    L = ["# Deployment latency: dense vs compiled, eager PyTorch and onnxruntime (CPU)\n"]
    L.append(f"- command: `{meta['command']}` (last run; each model's section names the run that measured it; "
             "`python benchmarks/latency.py` reruns everything)")
    L.append(f"- date: {meta['date']}")
    L.append(f"- versions: torch {meta['torch']}, timm {meta['timm']}, onnxruntime {meta['onnxruntime']}, "
             f"torch-pruning {meta['torch_pruning']}, vitcc {meta['vitcc']}, python {meta['python']}")
    L.append(f"- machine: {meta['machine']['cpu']} ({meta['machine']['arch']}), {meta['machine']['ncpu']} CPUs shared "
             f"with other engineers' work; {meta['threads']} intra-op thread (torch.set_num_threads and onnxruntime "
             "intra_op_num_threads), fp32, random weights")
    L.append(f"- load average (1/5/15 min) at start: {meta['loadavg'][0]}, at end: {meta['loadavg'][1]} "
             "(per block of measurements in the JSON)")
    L.append(f"- vitcc: `vitcc.compile(model, 'magnitude', sparsity=s, target='macs', align={meta['align']})`; "
             "Torch-Pruning: its timm ViT setup (benchmarks/compile_time.py `run_tp`: MetaPruner, "
             f"GroupMagnitudeImportance(p=2), heads and head dims pruned, round_to={meta['tp_round_to']}) at the "
             "ratio that matches vitcc's MACs (closest of up to 3 tries)")
    L.append(f"- timing: all variants of a model in one process, interleaved (each round calls each once, rotating "
             f"order), {meta['warmup']} warm-up rounds, medians over {meta['rounds']} rounds at batch 1 and "
             f"{meta['rounds_large']} at batch 32. **wall** = wall-clock; **cpu** = process CPU time, which leaves "
             "out time spent waiting for a core while other processes ran (with 1 thread it is the cleaner "
             "figure on this shared machine).")
    L.append("- speed-up = dense / compact, the median over rounds of the per-round ratio (load that changes more slowly "
             "than a round cancels; the ratio of the medians is in the JSON too); ideal = dense MACs / compact MACs; "
             "**efficiency = speed-up / ideal**.\n")

    headline = data.get("headline")
    if headline:
        L.append("## Headline: DeiT-S, 50% of MACs removed\n")
        L.append("| runtime | batch | speed-up (wall) | ideal | efficiency (wall) | efficiency (cpu) |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for h in headline:
            L.append(f"| {h['runtime']} | {h['batch']} | {_x(h['speedup'])} | {_x(h['ideal'])} | "
                     f"**{_pct(h['efficiency'], 1)}** | {_pct(h['efficiency_cpu'], 1)} |")
        L.append("")

    for key, m in data["models"].items():
        L.append(f"## {m['label']} (`{m['model']}`)\n")
        info = m["variants"]
        d = info["dense"]
        L.append(f"dense: {d['params'] / 1e6:.2f}M parameters, {d['macs'] / 1e9:.3f} GMACs (batch 1). "
                 f"Load average {m['loadavg_start']} -> {m['loadavg_end']}; {m.get('seconds', 0):.0f} s. "
                 f"Measured by `{m.get('command', meta['command'])}` on {m.get('date', meta['date'])}.\n")
        runs = m["runs"]
        cols = [(r["runtime"], r["batch"]) for r in runs]
        L.append("| variant | MACs kept | params | ideal | " + " | ".join(f"{rt} b{b}" for rt, b in cols) + " |")
        L.append("|---|---:|---:|---:|" + "---:|" * len(cols))
        for n, v in info.items():
            if n == "dense":
                cells = [f"{r['stats']['dense']['wall']:.1f} ms" if "dense" in r["stats"] else "n/a" for r in runs]
                L.append(f"| dense | 100% | {d['params'] / 1e6:.2f}M | 1.00x | " + " | ".join(cells) + " |")
                continue
            if "error" in v:
                L.append(f"| {n} | failed | | | " + " | ".join("" for _ in runs) + " |")
                continue
            cells = []
            for r in runs:
                c = r.get("compare", {}).get(n)
                cells.append("-" if c is None else f"{c['speedup']:.2f}x, **{_pct(c['efficiency'])}** "
                                                   f"(cpu {_pct(c['efficiency_cpu'])})")
            L.append(f"| {n} | {_pct(v['macs'] / d['macs'], 1)} | {v['params'] / 1e6:.2f}M | "
                     f"{_x(d['macs'] / v['macs'])} | " + " | ".join(cells) + " |")
        L.append("\nCells: speed-up (wall), **efficiency (wall)** (efficiency from CPU time). Dense row: median ms.\n")
        notes = []
        dense_ops = (d.get("onnx") or {}).get("ort_optimized_nodes")
        if dense_ops:
            same = [n for n, v in info.items() if n != "dense" and (v.get("onnx") or {}).get("ort_optimized_nodes")
                    == dense_ops]
            other = [n for n, v in info.items() if n != "dense" and (v.get("onnx") or {}).get("ort_optimized_nodes")
                     not in (None, dense_ops)]
            notes.append("- onnxruntime-optimized graphs (ORT_ENABLE_ALL): same op histogram as dense: "
                         f"{', '.join(same) or 'none'}" + (f"; different: {', '.join(other)}" if other else "")
                         + f". Dense: {', '.join(f'{k} {v}' for k, v in sorted(dense_ops.items()))}")
        for n, v in info.items():
            if "error" in v:
                notes.append(f"- {n}: **failed**: `{v['error']}`")
            if "onnx_error" in v:
                notes.append(f"- {n}: ONNX export failed: `{v['onnx_error']}`")
            if n.startswith("tp-") and "tried" in v:
                notes.append(f"- {n}: Torch-Pruning ratio {v['pruning_ratio']:.4f} (tried "
                             + ", ".join(f"{r:.4f} -> MACs kept {k:.3f}" for r, k in v["tried"])
                             + f"); heads {v.get('heads')}, head dim {v.get('head_dim')}, embed {v.get('embed_dim')}, "
                             f"mlp {v.get('mlp_hidden')}")
            if n.startswith("vitcc") and "widths" in v:
                notes.append(f"- {n}: widths " + ", ".join(f"{k} {x['after']}/{x['before']}"
                                                         for k, x in v["widths"].items())
                             + f"; max |compact - masked| {v.get('max_abs_error', 0):.1e}")
        if notes:
            L.append("Variants:\n")
            L.extend(notes)
            L.append("")

    lt = data.get("latency_target") or {}
    if lt:
        L.append("## `--target latency`: requested vs measured latency reduction (eager, batch 1)\n")
        L.append("`vitcc.compile(model, 'magnitude', sparsity=s, target='latency', align=8)` (vitcc.latency's per-op "
                 "model, cache under $VITCC_CACHE or ~/.cache/vitcc), then dense and compact timed together as "
                 "above. Aim: measured within 5 points of requested.\n")
        L.append("| model | requested | predicted | measured (wall) | measured (cpu) | MACs removed | selection | "
                 "widths kept | run |")
        L.append("|---|---:|---:|---:|---:|---:|---|---|---|")
        for key, m in lt.items():
            info, run = m["variants"], m["runs"][0]
            d = info["dense"]
            for n, v in info.items():
                if n == "dense":
                    continue
                if "error" in v:
                    L.append(f"| {m['label']} | {_pct(v['sparsity'])} | failed: `{v['error'][:120]}` | | | | | | |")
                    continue
                c = run.get("compare", {}).get(n, {})
                w = ", ".join(f"{k} {x['after']}/{x['before']}" for k, x in v["widths"].items())
                L.append(f"| {m['label']} | {_pct(v['sparsity'])} | {_pct(v['latency_model']['predicted_reduction'], 1)}"
                         f" | **{_pct(c.get('reduction'), 1)}** | {_pct(c.get('reduction_cpu'), 1)} | "
                         f"{_pct(1 - v['macs'] / d['macs'], 1)} | {v['latency_model'].get('selection', '')} | {w} | "
                         f"{m['date']}, load {m['loadavg_start']} |")
        L.append("")

    sweep = data.get("align_sweep")
    if sweep:
        info = sweep["variants"]
        L.append("## --align sweep: DeiT-S, 50% of MACs removed\n")
        cols = [(r["runtime"], r["batch"]) for r in sweep["runs"]]
        L.append("| align | head dim | residual | mlp/block | MACs kept | " + " | ".join(
            f"{rt} b{b} eff (wall / cpu)" for rt, b in cols) + " |")
        L.append("|---:|---:|---:|---:|---:|" + "---:|" * len(cols))
        for n, v in info.items():
            if n == "dense":
                continue
            w = v["widths"]
            cells = []
            for r in sweep["runs"]:
                c = r.get("compare", {}).get(n)
                cells.append("n/a" if c is None else f"{_pct(c['efficiency'], 1)} / {_pct(c['efficiency_cpu'], 1)}")
            L.append(f"| {v['align']} | {v.get('head_dim')} | {w['residual']['after']} | "
                     f"{w['mlp']['after'] // max(w['mlp']['groups'], 1)} | {_pct(v['macs'] / info['dense']['macs'], 1)} | "
                     + " | ".join(cells) + " |")
        L.append("")
        L.append(align_choice(sweep) + "\n")

    mic = data.get("micro")
    if mic:
        L.append("## Microbenchmarks (CPU time relative to the full-width op, 1 thread)\n")
        L.append("SDPA, 6 heads x 197 tokens, against head dim (full: 64):\n")
        L.append("| head dim | " + " | ".join(str(r["head_dim"]) for r in mic["sdpa"]) + " |")
        L.append("|---|" + "---:|" * len(mic["sdpa"]))
        L.append("| time / time(64) | " + " | ".join(f"{r['relative']:.2f}" for r in mic["sdpa"]) + " |")
        L.append("| time / ideal | " + " | ".join(f"{r['relative'] / r['ideal']:.2f}" for r in mic["sdpa"]) + " |")
        if mic.get("sdpa_b32"):
            L.append("\nSDPA at batch 32 (same shapes otherwise):\n")
            L.append("| head dim | " + " | ".join(str(r["head_dim"]) for r in mic["sdpa_b32"]) + " |")
            L.append("|---|" + "---:|" * len(mic["sdpa_b32"]))
            L.append("| time / time(64) | " + " | ".join(f"{r['relative']:.2f}" for r in mic["sdpa_b32"]) + " |")
            L.append("| time / ideal | " + " | ".join(f"{r['relative'] / r['ideal']:.2f}" for r in mic["sdpa_b32"])
                     + " |")
        L.append("\nLinear 197 x k -> 4k (DeiT-S fc1 is k = 384):\n")
        L.append("| k | " + " | ".join(str(r["in"]) for r in mic["linear"]) + " |")
        L.append("|---|" + "---:|" * len(mic["linear"]))
        L.append("| time / ideal | " + " | ".join(f"{r['relative'] / r['ideal']:.2f}" for r in mic["linear"]) + " |")
        if mic.get("linear_n"):
            L.append("\nLinear 1104 -> N (an fc2 of DeiT-S at 50%), time per FLOP relative to N = 384, by output "
                     "width N (N mod 8 in brackets):\n")
            ns = sorted({r["out"] for r in mic["linear_n"]})
            L.append("| rows | " + " | ".join(f"{n} ({n % 8})" for n in ns) + " |")
            L.append("|---|" + "---:|" * len(ns))
            for rows in sorted({r["rows"] for r in mic["linear_n"]}):
                by = {r["out"]: r for r in mic["linear_n"] if r["rows"] == rows}
                L.append(f"| {rows} (batch {rows // 197}) | " + " | ".join(
                    f"{by[n]['relative'] / by[n]['ideal']:.2f}" for n in ns) + " |")
        L.append("")
    L.append(FINDINGS)
    return "\n".join(L)


def align_choice(sweep: dict) -> str:
    """Which --align is fastest relative to its ideal, averaged over the sweep's runtimes and batches."""
    info, runs = sweep["variants"], sweep["runs"]
    score = {}
    for n, v in info.items():
        effs = [r["compare"][n]["efficiency_cpu"] for r in runs if n in r.get("compare", {})]
        if effs:
            score[v["align"]] = (statistics.mean(effs), effs)
    if not score:
        return ""
    best = max(score, key=lambda a: score[a][0])
    parts = ", ".join(f"align {a}: {m:.1%}" for a, (m, _) in sorted(score.items()))
    close = sorted(a for a in score if score[best][0] - score[a][0] <= 0.01)
    return (f"Mean efficiency (CPU time) over the runs above: {parts}; within a point of the best: align "
            f"{', '.join(map(str, close))}. Which widths a sweep lands on is luck of the model (here align 4 "
            "gives the same head dim and residual as align 8 except a 276-wide output); the GEMM table below "
            "shows why 4 is not enough in general and 8 is: output widths of 4 mod 8 cost up to 1.5x per FLOP "
            "at batch 32. Larger multiples only coarsen the widths (align 32 misses the MAC target).")


def headline(data: dict) -> list:
    m = data["models"].get("deit_s")
    if not m:
        return []
    out = []
    for r in m["runs"]:
        c = r.get("compare", {}).get("vitcc-50")
        if c:
            out.append({"runtime": r["runtime"], "batch": r["batch"], **c})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="deit_s,vit_b,swin_t", help=f"comma-separated from {', '.join(MODELS)}")
    ap.add_argument("--sparsities", default="0.25,0.5,0.75", help="fractions of MACs to remove")
    ap.add_argument("--latency-targets", default="0.25,0.5", help="--target latency fractions ('' to skip)")
    ap.add_argument("--align", type=int, default=8, help="vitcc --align for the main comparison")
    ap.add_argument("--align-sweep", default="1,4,8,16,32", help="'' to skip")
    ap.add_argument("--sweep-batches", default="1,32")
    ap.add_argument("--batches", default="1,32", help="eager batch sizes")
    ap.add_argument("--onnx-batches", default="1,32", help="onnxruntime batch sizes")
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--no-tp", dest="tp", action="store_false")
    ap.add_argument("--tp-round-to", type=int, default=None)
    ap.add_argument("--no-micro", dest="micro", action="store_false")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25, help="interleaved rounds at batch < 8")
    ap.add_argument("--rounds-large", type=int, default=5, help="interleaved rounds at batch >= 8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="DeiT-S only, 50%%, batch 1, few rounds, no sweep")
    ap.add_argument("--sections", default="models,latency,align,micro",
                    help="what to run: models (the comparison), latency (--target latency), align (the sweep), micro")
    ap.add_argument("--merge", action="store_true", help="keep what this run does not redo from an earlier run")
    ap.add_argument("--out", default=str(HERE / "results" / "latency"), help="path without extension")
    args = ap.parse_args(argv)
    floats = lambda s: [float(v) for v in s.split(",") if v]
    ints = lambda s: [int(v) for v in s.split(",") if v]
    args.sparsities, args.latency_targets = floats(args.sparsities), floats(args.latency_targets)
    args.batches, args.onnx_batches = ints(args.batches), ints(args.onnx_batches)
    args.align_sweep, args.sweep_batches = ints(args.align_sweep), ints(args.sweep_batches)
    models = [m for m in args.models.split(",") if m]
    if args.quick:
        models, args.sparsities, args.latency_targets = ["deit_s"], [0.5], [0.5]
        args.batches = args.onnx_batches = args.sweep_batches = [1]
        args.rounds, args.align_sweep, args.micro = 7, [], False
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    data = {"models": {}}
    if args.merge and out.with_suffix(".json").exists():
        data = json.loads(out.with_suffix(".json").read_text())
    la0 = loadavg()
    t0 = time.perf_counter()
    # warm-up: lazy imports and one-time inits are not billed to the first model
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=10).eval()
    vitcc.compile(tiny, "magnitude", sparsity=0.5, example_inputs=(torch.randn(1, 3, 32, 32),))

    sections = set(args.sections.split(","))
    if "models" in sections:
        for key in models:
            data["models"][key] = bench_model(key, args)
            _write(data, args, out, la0, t0)
    if "latency" in sections and args.latency_targets:
        data.setdefault("latency_target", {})
        for key in models:
            data["latency_target"][key] = latency_targets(key, args)
            _write(data, args, out, la0, t0)
    if "align" in sections and args.align_sweep:
        data["align_sweep"] = align_sweep(args)
        _write(data, args, out, la0, t0)
    if "micro" in sections and args.micro:
        data["micro"] = micro(args)
    _write(data, args, out, la0, t0)
    print(f"wrote {out.with_suffix('.md')} and .json ({time.perf_counter() - t0:.0f}s)")


def _version(dist: str) -> str:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def _write(data, args, out: Path, la0, t0) -> None:
    import onnxruntime
    data["meta"] = {
        "command": _command(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "timm": timm.__version__, "onnxruntime": onnxruntime.__version__,
        "torch_pruning": _version("torch-pruning") if tp is not None else "not installed",
        "vitcc": getattr(vitcc, "__version__", "?"), "python": platform.python_version(),
        "machine": machine_info(args.threads), "threads": args.threads, "align": args.align,
        "tp_round_to": args.tp_round_to, "rounds": args.rounds, "rounds_large": args.rounds_large,
        "warmup": args.warmup, "loadavg": [la0, loadavg()], "seconds": time.perf_counter() - t0}
    data["headline"] = headline(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    out.with_suffix(".json").write_text(text + "\n")
    out.with_suffix(".md").write_text(render(data))


if __name__ == "__main__":
    main()
