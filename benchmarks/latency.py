"""Deployment latency: dense vs vitcc-compiled (and Torch-Pruning-pruned) ViTs, eager PyTorch and onnxruntime.

For DeiT-S, ViT-B and Swin-T (random weights), at 25%, 50% and 75% of MACs removed
(`vitcc.compile(model, "magnitude", sparsity=s, target="macs", align=A)`), measures on CPU:

* eager PyTorch at batch 1 and 32, and onnxruntime (vitcc.deploy.export.export_onnx, verified) at batch 1 and 32;
* every variant of one model is timed in one process, interleaved: each round calls every variant once,
  in a rotating order; figures are medians over rounds of wall-clock time, with process CPU time beside
  it (CPU time leaves out the time the process waited for a core on a shared machine; with one thread
  it is the cleaner figure of what the model costs);
* speed-up = dense / compact, ideal = dense MACs / compact MACs, efficiency = speed-up / ideal;
* Torch-Pruning (if installed) prunes the same model at the ratio that gives vitcc's widths (its timm
  ViT setup, benchmarks/compile_time.py::run_tp; on Swin MLP neurons only, the part it can prune there
  without model code), timed beside it;
* `--target latency` at 25% and 50% (against the latency table the compile measures on the CPU when given none,
  eager, batch 1, or reads from the cache under $VITCC_CACHE; vitcc.profiling.table_for): the measured latency
  reduction against the requested one;
* an --align sweep on DeiT-S at 50% of MACs (the evidence for the CLI's --align default), and a
  microbenchmark of SDPA and linear latency against width.

* a breakdown (`--sections breakdown`): torch.profiler self CPU time per op category and
  calls per aten op, dense vs compact at 50% of MACs removed, eager, batch 1, to show which ops shrink less
  than the MAC ratio and whether the compact graph runs any op the dense one does not.

Usage:  python benchmarks/latency.py [--quick] [--models deit_s,vit_b,swin_t]
                                    [--sections models,latency,align,micro,breakdown] [--threads 1] [--merge]
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
from vitcc.deploy.export import export_onnx  # noqa: E402
from vitcc.deploy.timing import (flush_subnormals_in_this_process, flushed_subnormals, interleaved,  # noqa: E402
                                  intra_op_threads, loadavg, machine_info, onnx_cpu_session, onnx_feed, onnx_session,
                                  steady_heap, summarize, time_ratio, with_batch)
from vitcc.metrics import count_macs, count_params  # noqa: E402

try:
    from compile_time import run_tp, tp, tp_mlp_pruner  # Torch-Pruning set up for timm ViTs (its example's)
except Exception:  # pragma: no cover
    run_tp, tp, tp_mlp_pruner = None, None, None

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

def compile_variant(dense, x, s: float, target: str, args, mods: dict, info: dict, key: str, prune=None,
                    threads=None):
    """vitcc's magnitude compile of `dense` into mods[key] / info[key]; the error in info[key] on failure."""
    t0 = time.perf_counter()
    try:
        r = vitcc.compile(dense, "magnitude", sparsity=s, target=target, align=args.align, example_inputs=(x,),
                          prune=prune, threads=threads)
    except Exception as e:
        info[key] = {"error": _err(e), "sparsity": s}
        traceback.print_exc()
        return None
    mods[key] = r.module.eval()
    rep = r.report
    info[key] = {"sparsity": s, "target": target, "align": args.align, "params": rep["params_after"],
                 "macs": rep["macs_after"], "widths": rep["widths"], "max_abs_error": rep.get("max_abs_error"),
                 "removed_branches": rep.get("removed_branches", []), "prune": prune,
                 "compile_s": time.perf_counter() - t0, **({"latency_model": rep["latency_model"]}
                                                           if "latency_model" in rep else {})}
    return r


def build_variants(name: str, x: torch.Tensor, args) -> tuple[dict, dict]:
    """name -> module, and name -> info (params, MACs, how it was built, errors)."""
    dense = _make(name)
    mods, info = {"dense": dense}, {"dense": {"params": count_params(dense), "macs": count_macs(dense, (x,))}}
    for s in args.sparsities:
        key = f"vitcc-{int(s * 100)}"
        t0 = time.perf_counter()
        r = compile_variant(dense, x, s, "macs", args, mods, info, key)
        if r is None:
            continue
        rep = r.report
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


def prune_tp_mlp(name: str, x: torch.Tensor, goal: float, dense_macs: int):
    """Swin: Torch-Pruning on MLP neurons only (what it can prune without model code), ratio bisected to
    keep `goal` of the MACs."""
    lo, hi, tried, best = 0.0, 0.95, [], None
    for _ in range(8):
        ratio = (lo + hi) / 2
        model = _make(name)
        tp_mlp_pruner(model, x, ratio).step()
        kept = count_macs(model, (x,)) / dense_macs
        tried.append((ratio, kept))
        if best is None or abs(kept - goal) < abs(best[1] - goal):
            best = (ratio, kept, model)
        if abs(kept - goal) <= 0.005:
            break
        lo, hi = (ratio, hi) if kept > goal else (lo, ratio)
    ratio, kept, model = best
    if kept > goal + 0.02:
        raise RuntimeError(f"Torch-Pruning can prune only the MLP neurons of Swin (no head-aware handling of its "
                           f"relative-position-bias table); at ratio {ratio:.2f} it keeps {kept:.1%} of the MACs, "
                           f"short of {goal:.1%}")
    model.eval()
    with torch.no_grad():
        model(x)
    return model, {"pruning_ratio": ratio, "round_to": None, "params": count_params(model),
                   "macs": count_macs(model, (x,)), "setup": "MLP neurons only",
                   "mlp_hidden": model.layers[0].blocks[0].mlp.fc1.out_features, "tried": tried}


def prune_tp(name: str, x: torch.Tensor, rep: dict, dense_macs: int, args):
    """Torch-Pruning at the ratio that gives vitcc's residual width; one secant step towards vitcc's MACs."""
    import warnings
    goal = rep["macs_after"] / dense_macs
    if name.startswith("swin"):
        return prune_tp_mlp(name, x, goal, dense_macs)
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
    onnx_cpu_session(path, so)
    return _onnx_ops(path.with_suffix(".opt.onnx"))


def time_onnx(paths: dict, x: torch.Tensor, batch: int, args, threads: int | None = None) -> dict:
    sessions = {n: onnx_session(p, threads or args.threads) for n, p in paths.items()}
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
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": machine_info()["cpu"]}
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


def thread_counts(spec: str) -> list[int]:
    """'1,2,all' -> [1, 2, os.cpu_count()], each count once, in order."""
    counts = [os.cpu_count() or 1 if v == "all" else int(v) for v in spec.split(",") if v]
    return list(dict.fromkeys(counts))


THREAD_VARIANTS = {  # key -> --prune kinds (None: the default widths); all at 50% of MACs
    "vitcc-50": None,
    "branch-50": "branch",
    "branch+widths-50": "residual,heads,head_dim,mlp,branch",
}


def threads_section(args) -> dict:
    """DeiT-S, 50% of MACs removed by widths, by whole branches, and by both, timed against dense at every
    thread count in `--thread-counts`, eager and onnxruntime, at the `--thread-batches`."""
    label, name = MODELS["deit_s"]
    print(f"== threads: {label}, counts {args.thread_counts}", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t_start = time.perf_counter()
    dense = _make(name)
    mods, info = {"dense": dense}, {"dense": {"params": count_params(dense), "macs": count_macs(dense, (x,))}}
    for key, prune in THREAD_VARIANTS.items():
        if compile_variant(dense, x, 0.5, "macs", args, mods, info, key, prune=prune) is not None:
            v = info[key]
            print(f"  {key}: MACs kept {v['macs'] / info['dense']['macs']:.3f}, branches removed "
                  f"{len(v['removed_branches'])}", flush=True)
    out = {"label": label, "model": name, "runs": [], "variants": info, "loadavg_start": loadavg(),
           "command": _command(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "cpu": machine_info()["cpu"]}
    rounds = argparse.Namespace(**{**vars(args), "rounds": args.thread_rounds, "rounds_large": args.thread_rounds})
    fixed = list(mods)
    with tempfile.TemporaryDirectory(prefix="vitcc-threads-") as tmp:
        paths = export_all(mods, x, Path(tmp), info, fixed) if args.onnx else {}
        for threads in args.thread_counts:
            # --target latency --threads N: ops timed at this count (its own cache), then timed here with the rest
            key = f"latency-50@{threads}"
            names = fixed
            if compile_variant(dense, x, 0.5, "latency", args, mods, info, key, threads=threads) is not None:
                names = [*fixed, key]
                if args.onnx:
                    paths.update(export_all(mods, x, Path(tmp), info, [key]))
                print(f"  {key}: predicted reduction {info[key]['latency_model']['predicted_reduction']:.3f}, MACs "
                      f"kept {info[key]['macs'] / info['dense']['macs']:.3f}", flush=True)
            with intra_op_threads(threads):
                for b in args.thread_batches:
                    runs = [time_eager(mods, x, b, rounds, names)]
                    if paths:
                        runs.append(time_onnx({n: paths[n] for n in names if n in paths}, x, b, rounds,
                                              threads=threads))
                    for run in runs:
                        run["threads"] = threads
                        compare([run], info)
                        print(f"  {threads} thread(s):", flush=True)
                        _print_run(run)
                    out["runs"].extend(runs)
    out["loadavg_end"] = loadavg()
    out["seconds"] = time.perf_counter() - t_start
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
        r = compile_variant(dense, x, s, "latency", args, mods, info, k)
        if r is None:
            continue
        rep = r.report
        print(f"  {k}: predicted reduction {rep['latency_model']['predicted_reduction']:.3f}, MACs kept "
              f"{rep['macs_after'] / rep['macs_before']:.3f}, table {rep['latency_model']['table']}, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    out["variants"] = info
    out["runs"] = [time_eager(mods, x, 1, args)]
    compare(out["runs"], info)
    _print_run(out["runs"][0])
    out["loadavg_end"] = loadavg()
    return out


# ----------------------------------------------------------------------------------- align sweep, micro

def align_sweep(args) -> dict:
    """DeiT-S at 50% of MACs removed, --align 1, 4, 8, 16, 32: eager and onnxruntime at the sweep batches."""
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
            runs += [time_onnx(paths, x, b, args) for b in args.sweep_batches]
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


# ------------------------------------------------------------------------------- breakdown (profiler)

_VIEW_OPS = {"view", "permute", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice", "narrow", "unbind",
             "split", "chunk", "as_strided", "t", "alias", "dropout", "_unsafe_view", "detach", "_reshape_alias",
             "lift_fresh", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg", "__getitem__"}
_COPY_OPS = {"contiguous", "clone", "copy_", "reshape", "flatten", "to", "_to_copy"}


def _numel(shape) -> int:
    if not shape:
        return 0
    if isinstance(shape[0], (list, tuple)):  # a TensorList argument (cat, stack)
        return sum(_numel(s) for s in shape)
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _first_shape(shapes):
    return next((s for s in shapes or [] if s), [])


def _op_work(op: str, shapes) -> int:
    """Work of one top-level aten op from its input shapes: MACs for GEMMs and attention, else input numel."""
    s = [list(v) if isinstance(v, (list, tuple)) else [] for v in (shapes or [])]
    try:
        if op == "linear" and len(s) >= 2 and s[0] and s[1]:
            return _numel(s[0][:-1]) * s[0][-1] * s[1][0]
        if op in ("matmul", "bmm") and len(s) >= 2 and s[0] and s[1]:
            return _numel(s[0][:-1]) * s[0][-1] * s[1][-1]
        if op in ("mm", "addmm") and len(s) >= 2:
            a, b = (s[1], s[2]) if op == "addmm" else (s[0], s[1])
            return a[0] * a[1] * b[1]
        if op == "scaled_dot_product_attention" and len(s) >= 3:
            q, k, v = s[:3]
            return _numel(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
        if op in ("conv2d", "convolution") and len(s) >= 2:  # patchify convs: stride = kernel
            x, w = s[0], s[1]
            return _numel(w) * (x[-2] // w[-2]) * (x[-1] // w[-1]) * x[0]
    except (IndexError, TypeError, ZeroDivisionError):
        pass
    return _numel(_first_shape(s))


def _op_category(op: str, shapes) -> str:
    """Category of a top-level aten op (the op the graph called; its time includes the aten ops it calls)."""
    x = list(_first_shape(shapes)) if shapes else []
    if op in ("linear", "addmm", "mm"):
        rows = _numel(x[:-1]) if op == "linear" and x else (x[0] if x else "?")
        return f"Linear (GEMM), {rows} rows"
    nw = (x[1] if len(x) == 5 else x[0]) if len(x) >= 4 else None  # batch x windows of attention-shaped tensors
    at = f", nW={nw}" if nw is not None else ""
    if op in ("matmul", "bmm", "baddbmm"):
        return f"attention matmuls (q@k^T, attn@v, with operand copies){at}"
    if op.startswith("scaled_dot_product") or op.startswith("_scaled_dot_product"):
        return "SDPA (fused flash attention)"
    if op in ("softmax", "_softmax"):
        return f"softmax{at}"
    if op in ("layer_norm", "native_layer_norm"):
        return "LayerNorm"
    if op == "gelu":
        return "GELU"
    if op in ("add", "add_"):
        if len(x) >= 4 and x[-1] == x[-2]:
            return f"add: attention bias / shift mask{at}"
        return "add: residual & other"
    if op in ("mul", "mul_"):
        return "mul (Swin: q * scale)"
    if op == "roll":
        return "roll (shifted windows)"
    if op in ("pad", "constant_pad_nd"):
        return "pad (window padding)"
    if op == "cat":
        return "cat (patch merging, cls token)"
    if op in ("index", "index_select", "gather", "take", "embedding"):
        return "index / gather (rel-pos bias)"
    if op in _COPY_OPS:
        return "copies (contiguous / reshape / clone / to)"
    if op in ("conv2d", "convolution", "_convolution"):
        return "Conv2d (patch embedding)"
    if op in _VIEW_OPS:
        return "views & no-ops (metadata only)"
    return f"other: aten::{op}"


def _profile_call(mod, x) -> dict:
    """One forward under torch.profiler: per-category ms (self CPU time of every aten op, charged to the top-level
    op that called it), calls and work per category, calls per aten op, and the wall time of the call."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        mod(x)
        wall = (time.perf_counter() - t0) * 1e3
    cats, ops = {}, {}
    ops_us = 0.0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        ops[e.name] = ops.get(e.name, 0) + 1
        top = e
        while top.cpu_parent is not None and top.cpu_parent.name.startswith("aten::"):
            top = top.cpu_parent
        name = top.name[len("aten::"):]
        cat = _op_category(name, top.input_shapes)
        c = cats.setdefault(cat, {"us": 0.0, "calls": 0, "work": 0, "ops": {}})
        c["us"] += e.self_cpu_time_total
        ops_us += e.self_cpu_time_total
        if top is e:
            c["calls"] += 1
            c["work"] += _op_work(name, e.input_shapes)
            c["ops"][name] = c["ops"].get(name, 0) + 1
    return {"wall": wall, "ops_ms": ops_us / 1e3, "cats": cats, "ops": ops}


def breakdown(key: str, args) -> dict:
    """Where the time goes: dense vs vitcc compact at --breakdown-sparsity, eager batch 1, torch.profiler.

    Three variants: dense (the timm module), dense-captured (the dense model as vitcc's torch.export capture
    sees it, unpruned: separates the cost of running the captured aten graph from the cost of pruning) and the compact model, built as the
    models section does. Profiled interleaved (one call of each per round, rotating order); per category the
    median over rounds."""
    from vitcc.frontend.capture import capture
    label, name = MODELS[key]
    s = args.breakdown_sparsity
    print(f"== breakdown: {label} ({name}), {int(s * 100)}% of MACs removed", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    dense = _make(name)
    r = vitcc.compile(dense, "magnitude", sparsity=s, target="macs", align=args.align, example_inputs=(x,))
    mods = {"dense": dense, "dense-captured": capture(dense, (x,)).eval(), "compact": r.module.eval()}
    macs = {"dense": count_macs(dense, (x,)), "compact": r.report["macs_after"]}
    out = {"label": label, "model": name, "sparsity": s, "align": args.align, "macs": macs,
           "widths": r.report["widths"], "command": _command(), "loadavg_start": loadavg(),
           "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "rounds": args.breakdown_rounds, "warmup": args.breakdown_warmup, "threads": torch.get_num_threads()}
    names = list(mods)
    samples = {n: [] for n in names}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(args.breakdown_warmup):
            for n in names:
                mods[n](x)
        for i in range(args.breakdown_rounds):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                samples[n].append(_profile_call(mods[n], x))
    out["seconds"] = time.perf_counter() - t0
    out["loadavg_end"] = loadavg()
    med = statistics.median
    var = {}
    for n in names:
        ss = samples[n]
        cats = sorted({c for p in ss for c in p["cats"]})
        first = ss[0]["cats"]
        var[n] = {"wall_ms": med(p["wall"] for p in ss), "ops_ms": med(p["ops_ms"] for p in ss),
                  "overhead_ms": med(p["wall"] - p["ops_ms"] for p in ss),
                  "aten_calls": ss[0]["ops"], "calls_stable": all(p["ops"] == ss[0]["ops"] for p in ss),
                  "cats": {c: {"ms": med(p["cats"].get(c, {}).get("us", 0.0) / 1e3 for p in ss),
                               "calls": first.get(c, {}).get("calls", 0), "work": first.get(c, {}).get("work", 0),
                               "ops": first.get(c, {}).get("ops", {})} for c in cats}}
    out["variants"] = var
    d, c = var["dense"], var["compact"]
    print(f"  dense {d['ops_ms']:.1f} ms in ops (+{d['overhead_ms']:.1f} ms outside), dense-captured "
          f"{var['dense-captured']['ops_ms']:.1f} (+{var['dense-captured']['overhead_ms']:.1f}), compact {c['ops_ms']:.1f} "
          f"(+{c['overhead_ms']:.1f}); ideal {macs['dense'] / macs['compact']:.2f}x, {out['seconds']:.0f}s", flush=True)
    for cat, v in sorted(d["cats"].items(), key=lambda t: -t[1]["ms"]):
        cv = c["cats"].get(cat, {"ms": 0.0, "calls": 0})
        print(f"    {cat:45s} {v['calls']:4d} {cv['calls']:4d} {v['ms']:8.2f} {cv['ms']:8.2f}", flush=True)
    return out


# ------------------------------------------------------------------------------------------- render

FINDINGS = """## What the measurements say (and what changed in vitcc)

1. **Unaligned widths are slow on this CPU**, and that is the one avoidable slowdown the compact
   models had. MKL's sgemm runs a Linear whose output width is not a multiple of 8 up to 1.5x slower
   per FLOP once the row count is large (table above: at batch 32, N = 268, 284, 330, 332, 348 cost
   1.5x, 276 and 340 about 1.2x, every multiple of 8 about 1.0x; at batch 1 within 10%). The CPU
   flash-attention kernel behind `F.scaled_dot_product_attention` has the same sawtooth in the head dim
   (46 and 57 are slower than 48 and 56, at batch 1 and 32). onnxruntime's MLAS GEMM packs weight
   columns in panels of 16: in the align sweep DeiT-S at 50% runs at batch 32 in onnxruntime at 93% of
   the ideal with widths aligned to 8 and 97% with 16, while eager PyTorch is the same with either.
   Torch-Pruning's models at the same MACs show the effect: at 25% of MACs removed it keeps head dim 57
   and widths 342/855/1368 on DeiT-S and is barely faster than the dense model at batch 32 in eager
   PyTorch. vitcc's `--align N` rounds residual, head-dim and MLP widths (heads stay free: a head count
   times an aligned head dim is aligned). So **the CLI default of `vitcc compile --align` is 16** (also
   `vitcc bench --sparsity` and `vitcc profile`; it was 1, then 8 before onnxruntime at batch 32 was
   measured); `vitcc.compile(...)`'s Python default stays 1.
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
   removed) and is lowest at batch 1 in eager PyTorch, where those ops weigh most, and where the
   per-op Python and dispatch overhead (4.6 ms of DeiT-S's 120 ms, the same number of ops before and
   after pruning) costs another point or two.
4. **`--target latency`** (eager at the compile's batch) selects against a latency table measured on this CPU
   (vitcc.profiling: every residual branch timed at a grid of its widths as a ratio to its dense self, the
   whole model along every kind's grid to calibrate the rest; kept in the cache, so one measurement serves
   every later compile of the model there). It needs no per-model code. The search is select's budget search
   (the one `--target params|macs` use) on that prediction: the smallest uniform fraction that reaches the
   goal, refined where a kind takes a coarse step (a head fewer per block, a head dim at the alignment: Swin's
   32 is 32 or 16 at align 16): those kinds keep the widths of the largest fraction that falls short and the
   other kinds are searched again ("selection"). The same refinement keeps `--target macs` on target: before
   it, Swin-T asked for 50% of MACs lost 56% at align 16 (every head dim halved). The latency search also tries
   each kind up to 2 steps past those widths, the others searched again, and keeps the candidate within 2
   points of the goal that loses least (branches.BranchLoss): softmax and transposes follow the heads and head
   dims, not the MACs. Until 2026-12-06 a per-op model (each op timed alone at its compact shape, the rest one
   constant) did this job on the CPU; in one run against the same measured selections
   (`benchmarks/latency_prediction.py --per-op`, at commit ab60aa6) it predicted DeiT-S within a median 2.2
   points (worst 4.5) where the table did 1.5 (3.9), and Swin-T within 3.0 (worst 8.1, and +5.5/+5.9 on the
   selections that remove branches) where the table did 0.8 (3.7), so the table replaced it. Measured against
   requested with the tables (table above, Intel Xeon): +0.4 to +2.3 points, where the per-op model landed
   DeiT-S and ViT-B -3.5 to +1.6 and Swin-T +6.3/+6.5 on the same machine. A cold table took 62 s (DeiT-S),
   230 s (ViT-B) and 213 s (Swin-T) at 1 thread; the second compile of each read it in 2-4 s.
5. **Noise.** The machine is shared (see the load averages); wall-clock medians of interleaved runs
   still move by a few points between runs when the load is high, the CPU-time figures much less.
6. **Why Swin-T at 50% of MACs stays near 80-86% of the ideal (88-92% on the AMD EPYC) while DeiT-S and
   ViT-B reach 94-104%** (the breakdown tables above, eager, batch 1). Nothing in the compact graphs is
   extra: per aten op the compact graph makes exactly the calls of the traced dense graph (dense-captured),
   DeiT-S keeps its 12 fused SDPA calls, and Swin's window attention is unfused in the dense timm model too
   (timm sets `WindowAttention.fused_attn = use_fused_attn(experimental=True)`, off by default), so no
   fusion is lost. (Against the timm module itself, tracing makes a few `view`/`unsqueeze` calls fewer:
   torch.fx evaluates buffer-only expressions such as `relative_position_index.view(-1)` once.) Every op
   category runs at about its own work ratio (time / work 0.97-1.14 for everything that matters, but this
   Xeon's narrowed GEMMs on 3136 rows at 1.22), so the gap is work that does not follow the MACs. In DeiT-S
   that is the fused attention (10% of dense time; 60 of 72 heads at head dim 48 of 64 keep 62% of its work,
   more than the MAC ratio of 50%), GELU, LayerNorm and the patch embedding: 2.4 ms of 60 ms in ops, and
   GEMMs are 82% of the time. In Swin-T GEMMs are 69% (78% on the EPYC) and the rest is window attention
   (unfused matmuls and softmax), the relative-position bias and shift-mask adds, roll, pad, window copies,
   GELU and LayerNorm. Attention work follows the kept heads, not the MACs; stage 1 has 3 heads per block,
   which the selection keeps whole, so its attention over 64 windows (about 4% of dense time) does not
   shrink at all; the width-scaling ops shrink with the residual width and MLP (0.67-0.79). Together: 15.5
   ms of 78 ms in ops (10.1 of 76 on the EPYC). So the shortfall on Swin-T is inherent to pruning by MACs,
   not added by the compiler. Where latency rather than MACs is the goal, `--target latency` selects with
   these costs measured (its table above).
7. **Threads** (the threads table; DeiT-S at 50% of MACs). Removing whole branches runs at 102-120% of the
   ideal at 1 and 2 threads, eager and onnxruntime, batch 1 and 8 (AMD EPYC; 104-116% on a 2-core Intel Xeon
   the day before): a removed branch takes its LayerNorm, GELU, softmax and add with it, which the MAC ratio
   does not count. Narrowing (21 interleaved rounds): on the AMD EPYC eager PyTorch keeps 95-99% at 1 thread
   and 92-95% at 2, onnxruntime 92-93% at 1 and 85-90% at 2; on the Intel Xeon 89-93% at 1 thread and 85-93%
   at 2. So the 95% aim holds for eager PyTorch at 1 thread and not for onnxruntime or at 2 threads. What
   costs the narrower model is the same on both machines, and none of it is an op vitcc adds:
   - eager, 2 threads, batch 1 (`benchmarks/results/latency_breakdown_threads2.md`, Intel): the GEMMs run 8%
     slower per MAC than the dense ones (25% of the gap to the ideal); fused attention keeps 62% of its work
     (60 of 72 heads at head dim 48) while the MACs keep 50%, and runs 10% slower per unit of work (29%);
     GELU, LayerNorm, the adds and the patch embedding shrink only with the residual and MLP widths (71%) and
     run 4-36% slower per element at the smaller size, where a two-thread split has less to share (40%);
   - onnxruntime, 2 threads, batch 1 (its profiler, per op type, AMD): MatMul takes 0.51 of its dense time for
     0.50 of the MACs; everything else, 29% of the dense model's kernel time, takes 0.73-0.97 of it (BiasGelu
     0.77, Transpose 0.73, attention's scaled QK^T 0.74, Add 0.77, LayerNormalization 0.82, Softmax 0.97).
     ORT's CPU optimizer fuses no attention for this export in either model, so its transposes and softmax
     weigh more than in eager PyTorch, and they follow the heads and widths.
   Coarser widths do not close it (`benchmarks/results/latency_align_threads2.md`, align 16/32/64 at 2
   threads: 87-89% at batch 1 in eager, 84-86% in onnxruntime). Neither does pruning other kinds at the same
   MACs (one 11-round run, AMD, eager: no head dims 89-99%, no heads 87-101%, residual and MLP only 86-98%,
   against 90-104% for all kinds: within the run-to-run spread of several points at 2 threads). Pruning
   attention as far as the rest does help a little: 4 of 6 heads per block at head dim 48 (attention keeps 50%
   of its work, residual 288 and MLP 1136 wide for the same 49.8% of MACs) against the search's 5 of 6
   measured eager 97/100/92/102% and onnxruntime 97/97/93/95% (1 thread b1/b8, 2 threads b1/b8) where the
   default selection measured 93/96/92/99% and 97/97/89/93% in the same 15-round run (AMD). The params and
   MACs search tries a coarse kind only at the step the uniform fraction reaches or the one before (5 heads
   here); trying further steps there would change every such selection, with an accuracy cost not measured,
   so it is left as it is. The latency search now does try them: each kind up to 2 steps past the widths of
   the largest fraction short of the goal, the other kinds searched again, and of the candidates within 2
   points of the goal the one with the least loss (selection.search_budget, `further_steps`). With the
   latency table measured at each thread count (Intel, 21 rounds), asked for 50%, the search at 1 thread keeps
   5 of 6 heads but a quarter of the head dims (384 of 1536), residual 288 and MLP 1184: 42.4% of the MACs,
   predicted 50.5% and measured 51.0% faster (eager b1); at 2 threads 3 of 6 heads at full head dim, residual
   288 and MLP 1120: 45.6% of the MACs, predicted 50.4%, measured 46.9%. Against the MACs ideal these rows
   run at 87/89/93/93% at 1 thread and 86/85/94/98% at 2 (eager b1, onnxruntime b1, eager b8, onnxruntime
   b8), against `vitcc-50`'s 90/91/96/93% and 85/83/91/93% in the same run; in speed they are ahead
   (2.04-2.19x against 1.81-1.94x at 1 thread). So batch 8 comes to 94-98% at 2 threads, and batch 1
   stays at 85-86%: at 50 ms a call, the ops that follow the widths rather than the MACs (GELU, LayerNorm,
   adds, the patch embedding) split worse over two threads at the smaller size, and a selection cannot move
   that work into the GEMMs.
   Per aten op the compact graph makes the dense graph's calls, and the
   optimized onnxruntime graphs have the same op histogram. Two exporter changes were tried and left out:
   opset 23, where SDPA exports as ONNX `Attention` (which onnxruntime 1.32 runs), and onnxruntime's offline
   transformer optimizer (24 SkipLayerNormalization fusions, no attention fusion); in one 15-round run each
   (AMD) they moved the compact model's efficiency by -15 to +10 points against the plain export, in no
   consistent direction (each gives the dense and compact graphs the same op histogram). One measurement fix:
   sessions timed in turns spun their idle worker threads on the cores the next session ran on (a dense DeiT-S
   at 2 threads, batch 1, ran no faster than at 1), so `vitcc.deploy.timing.onnx_session` lets idle workers sleep
   (`vitcc bench` times its sessions the same way; with spinning on and a 50 ms pause between calls instead,
   the compact model's efficiency is the same). `--target latency --threads N` measures its table at N threads
   (each count its own table in the cache).
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
    L.append(f"- machine of the last run: {meta['machine']['cpu']} ({meta['machine']['arch']}), {meta['machine']['ncpu']} CPUs shared "
             f"with other engineers' work (each section names the CPU it was measured on); {meta['threads']} "
             "intra-op thread (torch.set_num_threads and onnxruntime intra_op_num_threads) except in the threads "
             "section, fp32, random weights")
    L.append(f"- load average (1/5/15 min) at start: {meta['loadavg'][0]}, at end: {meta['loadavg'][1]} "
             "(per block of measurements in the JSON)")
    L.append(f"- vitcc: `vitcc.compile(model, 'magnitude', sparsity=s, target='macs', align={meta['align']})`; "
             "Torch-Pruning: its timm ViT setup (benchmarks/compile_time.py `run_tp`: MetaPruner, "
             f"GroupMagnitudeImportance(p=2), heads and head dims pruned, round_to={meta['tp_round_to']}) at the "
             "ratio that matches vitcc's MACs (closest of up to 3 tries); on Swin, where that setup's model does not "
             "run, MLP neurons only (`tp_mlp_only_ignored`: window attention and patch merging left alone; ratio "
             "bisected)")
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

    L.extend(render_threads(data.get("threads")))

    for key, m in data["models"].items():
        L.append(f"## {m['label']} (`{m['model']}`)\n")
        info = m["variants"]
        d = info["dense"]
        L.append(f"dense: {d['params'] / 1e6:.2f}M parameters, {d['macs'] / 1e9:.3f} GMACs (batch 1). "
                 f"Load average {m['loadavg_start']} -> {m['loadavg_end']}; {m.get('seconds', 0):.0f} s. "
                 f"Measured by `{m.get('command', meta['command'])}` on {m.get('date', meta['date'])}"
                 f"{', ' + m['cpu'] if m.get('cpu') else ''}.\n")
        runs = m["runs"]
        L.extend(_variant_table(info, runs, [f"{r['runtime']} b{r['batch']}" for r in runs], "params",
                                lambda v: f"{v['params'] / 1e6:.2f}M"))
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
                what = (f"{v['setup']}, first block's mlp {v.get('mlp_hidden')}" if v.get("setup") else
                        f"heads {v.get('heads')}, head dim {v.get('head_dim')}, embed {v.get('embed_dim')}, "
                        f"mlp {v.get('mlp_hidden')}")
                notes.append(f"- {n}: Torch-Pruning ratio {v['pruning_ratio']:.4f} (tried "
                             + ", ".join(f"{r:.4f} -> MACs kept {k:.3f}" for r, k in v["tried"]) + f"); {what}")
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
        aligns = sorted({v.get("align") for m in lt.values() for k, v in m.get("variants", {}).items()
                         if isinstance(v, dict) and v.get("align")} or {data["meta"]["align"]})
        L.append(f"`vitcc.compile(model, 'magnitude', sparsity=s, target='latency', align={'/'.join(map(str, aligns))})` "
                 "(against the latency table the compile measures on this CPU, eager at batch 1, or reads from "
                 "the cache under $VITCC_CACHE or ~/.cache/vitcc), then dense and compact timed together as "
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
        if sweep.get("command"):
            L.append(f"Measured by `{sweep['command']}`.\n")
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
    L.extend(render_breakdown(data.get("breakdown") or {}))
    L.append(FINDINGS)
    return "\n".join(L)


def _variant_table(info: dict, runs: list, columns: list[str], extra: str, extra_of) -> list[str]:
    """Rows of variants against dense: MACs kept, one model-specific column, the ideal, and per run the
    speed-up and efficiency (dense: its median wall ms)."""
    d = info["dense"]
    L = [f"| variant | MACs kept | {extra} | ideal | " + " | ".join(columns) + " |",
         "|---|---:|---:|---:|" + "---:|" * len(runs)]
    for n, v in info.items():
        if n == "dense":
            L.append(f"| dense | 100% | {extra_of(v)} | 1.00x | " + " | ".join(
                f"{r['stats']['dense']['wall']:.1f} ms" if "dense" in r["stats"] else "n/a" for r in runs) + " |")
        elif "error" in v:
            L.append(f"| {n} | failed: `{v['error'][:100]}` | | | " + " | ".join("" for _ in runs) + " |")
        else:
            cells = []
            for r in runs:
                c = r.get("compare", {}).get(n)
                cells.append("-" if c is None else f"{c['speedup']:.2f}x, **{_pct(c['efficiency'])}** "
                                                   f"(cpu {_pct(c['efficiency_cpu'])})")
            L.append(f"| {n} | {_pct(v['macs'] / d['macs'], 1)} | {extra_of(v)} | {_x(d['macs'] / v['macs'])} | "
                     + " | ".join(cells) + " |")
    return L


def render_threads(th: dict | None) -> list:
    if not th:
        return []
    info, runs = th["variants"], th["runs"]
    counts = sorted({r["threads"] for r in runs})
    L = [f"## Threads: {th['label']}, 50% of MACs removed, at {', '.join(map(str, counts))} threads\n",
         f"Widths (`vitcc-50`), whole residual branches (`branch-50`: `--prune branch`) and both "
         f"(`branch+widths-50`), each `target='macs'`, align {info.get('vitcc-50', {}).get('align')}; timed "
         "against dense at each intra-op thread count (torch.set_num_threads, onnxruntime intra_op_num_threads), "
         f"interleaved, {runs[0]['stats']['dense']['n'] if runs else 0} rounds. Load average "
         f"{th['loadavg_start']} -> {th['loadavg_end']}; {th.get('seconds', 0):.0f} s. Measured by "
         f"`{th['command']}` on {th['date']}, {th.get('cpu', 'n/a')}. Aims (issue 11): at least 95% of the ideal at 1 and 2 threads in "
         "both runtimes, at least 98% for the branch-removal models.\n"]
    L.extend(_variant_table(info, runs, [f"{r['runtime']} b{r['batch']}, {r['threads']} thr" for r in runs],
                            "branches removed", lambda v: str(len(v.get("removed_branches") or []))))
    L.append("\nCells: speed-up (wall), **efficiency (wall)** (efficiency from CPU time, which counts every "
             "thread's time: above 1 thread it is the work, not the latency). Dense row: median wall ms.\n")
    for n, v in info.items():
        lm = v.get("latency_model")
        if lm:
            t = lm["measured"]["threads"] if "measured" in lm else lm.get("threads")  # (a run of the per-op model)
            run = next((r for r in runs if r["threads"] == t and r["runtime"] == "eager" and r["batch"] == 1), None)
            c = (run or {}).get("compare", {}).get(n, {})
            L.append(f"- {n}: `target='latency', threads={t}` ("
                     + ("its table measured" if "measured" in lm else "ops timed") + f" at {t} thread(s), eager, batch 1): "
                     f"requested 50%, predicted {_pct(lm['predicted_reduction'], 1)}, measured at {t} thread(s) "
                     f"**{_pct(c.get('reduction'), 1)}** (eager b1); widths "
                     + ", ".join(f"{k} {x['after']}/{x['before']}" for k, x in v["widths"].items()))
        elif v.get("removed_branches"):
            L.append(f"- {n}: removed {', '.join(v['removed_branches'])}; widths "
                     + ", ".join(f"{k} {x['after']}/{x['before']}" for k, x in v["widths"].items()))
        elif "widths" in v:
            L.append(f"- {n}: widths " + ", ".join(f"{k} {x['after']}/{x['before']}" for k, x in v["widths"].items()))
    L.append("")
    return L


def _count_diff(a: dict, b: dict) -> list:
    return [f"{k} {a.get(k, 0)} -> {b.get(k, 0)}" for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)]


def render_breakdown(bd: dict) -> list:
    if not bd:
        return []
    L = ["## Where the time goes: time per op category, dense vs compact (torch.profiler, eager, batch 1)\n"]
    L.append("`--sections breakdown`: the dense timm model, the same model as vitcc's torch.export capture sees it (dense-captured, "
             "unpruned) and the vitcc compact model (`vitcc.compile(model, 'magnitude', sparsity=0.5, target='macs', "
             f"align={'/'.join(sorted({str(m.get('align')) for m in bd.values()}))})`, as in the models section), "
             f"{'/'.join(sorted({str(m.get('threads', 1)) for m in bd.values()}))} thread(s), `torch.inference_mode()`, profiled interleaved (one "
             "call of each per round, rotating order) under `torch.profiler` (CPU, record_shapes). Every aten op's "
             "self CPU time is charged to the top-level aten op the graph called (so `aten::linear` holds its "
             "`addmm`, `aten::roll` and `aten::reshape` the copies they make) and grouped by category; figures are "
             "medians over the profiled calls. **work ratio** = compact / dense work of the category from the "
             "recorded input shapes (MACs for Linear, attention matmuls and SDPA; input elements for the rest): "
             "what the category would shrink by if its cost were proportional to its size; **time / work ratio** "
             "above 1 means the category runs slower per unit of work in the compact model (kernel efficiency "
             "lost at the smaller shape). **excess** = compact ms - "
             "dense ms x (compact MACs / dense MACs), the category's part of the gap between the compact model's "
             "time and its ideal; the gap column is its share of the total gap (sum of op time, the time outside "
             "aten ops excluded). Profiler timestamps are wall-clock, so load on the shared machine inflates "
             "them a little; ratios are of medians from interleaved calls.\n")
    for key, m in bd.items():
        v = m["variants"]
        d, c, f = v["dense"], v["compact"], v.get("dense-captured")
        macs = m["macs"]
        kept = macs["compact"] / macs["dense"]
        ideal = 1 / kept
        sp = d["ops_ms"] / c["ops_ms"]
        gap = c["ops_ms"] - d["ops_ms"] * kept
        L.append(f"### {m['label']} (`{m['model']}`), {_pct(m['sparsity'])} of MACs removed\n")
        L.append(f"MACs kept {_pct(kept, 1)} (ideal {_x(ideal)}); widths " + ", ".join(
            f"{k} {w['after']}/{w['before']}" for k, w in m["widths"].items())
                 + f". Time in aten ops: dense {d['ops_ms']:.1f} ms, compact {c['ops_ms']:.1f} ms: **speed-up "
                 f"{_x(sp)}, {_pct(sp / ideal, 1)} of ideal**; the gap to the ideal is {gap:.1f} ms. Whole call "
                 f"(wall, under the profiler): dense {d['wall_ms']:.1f} ms, compact {c['wall_ms']:.1f} ms"
                 + (f", dense-captured {f['wall_ms']:.1f} ms ({f['ops_ms']:.1f} ms in ops)" if f else "")
                 + f". {m['rounds']} profiled calls per variant after {m['warmup']} warm-up calls; load "
                 f"{m['loadavg_start']} -> {m['loadavg_end']}; `{m['command']}`, {m['date']}.\n")
        L.append("| op category | calls dense / compact | dense ms | compact ms | compact / dense | work ratio | "
                 "time / work ratio | share of dense | excess ms (share of gap) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        cats = sorted(set(d["cats"]) | set(c["cats"]), key=lambda k: -d["cats"].get(k, {}).get("ms", 0.0))
        zero = {"ms": 0.0, "calls": 0, "work": 0}
        for k in cats:
            a, b = d["cats"].get(k, zero), c["cats"].get(k, zero)
            ex = b["ms"] - a["ms"] * kept
            wr = b["work"] / a["work"] if a["work"] else None
            ratio = f"{b['ms'] / a['ms']:.2f}" if a["ms"] else "n/a"
            per = f"{b['ms'] / a['ms'] / wr:.2f}" if a["ms"] and wr else "n/a"
            L.append(f"| {k} | {a['calls']} / {b['calls']} | {a['ms']:.2f} | {b['ms']:.2f} | {ratio} | "
                     f"{'n/a' if wr is None else f'{wr:.2f}'} | {per} | {_pct(a['ms'] / d['ops_ms'], 1)} | "
                     f"{ex:+.2f} ({_pct(ex / gap, 0) if gap > 0 else 'n/a'}) |")
        L.append(f"| **all aten ops** | {sum(x['calls'] for x in d['cats'].values())} / "
                 f"{sum(x['calls'] for x in c['cats'].values())} | **{d['ops_ms']:.2f}** | **{c['ops_ms']:.2f}** | "
                 f"**{c['ops_ms'] / d['ops_ms']:.2f}** | MACs {kept:.2f} | {c['ops_ms'] / d['ops_ms'] / kept:.2f} | "
                 f"100% | {gap:+.2f} (100%) |")
        L.append(f"| outside aten ops (Python, module / FX dispatch, profiler) | | {d['overhead_ms']:.2f} | "
                 f"{c['overhead_ms']:.2f} | {c['overhead_ms'] / d['overhead_ms']:.2f} | | | | |")
        L.append("")
        dc = _count_diff(d["aten_calls"], c["aten_calls"])
        fc = _count_diff(f["aten_calls"], c["aten_calls"]) if f else None
        n_ops = sum(c["aten_calls"].values())
        line = (f"Calls per aten op (all {len(c['aten_calls'])} aten ops, {n_ops} calls in the compact model, nested "
                "ones included): compact vs dense: "
                + ("**identical**" if not dc else "differ: " + ", ".join(dc)))
        if fc is not None:
            line += "; compact vs dense-captured: " + ("**identical**" if not fc else "differ: " + ", ".join(fc))
        if not (d["calls_stable"] and c["calls_stable"]):
            line += " (counts varied between calls)"
        L.append(line + ".\n")
    return L


def align_choice(sweep: dict) -> str:
    """Which --align to default to: the best worst case over runtimes and batches among the aligns that
    land within a point of the requested MACs (the aim is the ideal speed-up in every runtime)."""
    info, runs = sweep["variants"], sweep["runs"]
    score, off = {}, {}
    for n, v in info.items():
        effs = [r["compare"][n]["efficiency_cpu"] for r in runs if n in r.get("compare", {})]
        if effs:
            score[v["align"]] = (statistics.mean(effs), min(effs))
            off[v["align"]] = v["macs"] / info["dense"]["macs"] - 0.5
    if not score:
        return ""
    parts = ", ".join(f"align {a}: mean {m:.1%}, worst {w:.1%}" for a, (m, w) in sorted(score.items()))
    eligible = [a for a in score if abs(off[a]) <= 0.01] or list(score)
    best = max(eligible, key=lambda a: score[a][1])
    missed = ", ".join(f"align {a} keeps {0.5 + off[a]:.1%} of the MACs" for a in sorted(score) if a not in eligible)
    return (f"Efficiency (CPU time) per align over the runtimes and batches above: {parts}. Among the aligns "
            f"that land within a point of the requested MACs, the best worst case is **align {best}**"
            + (f" ({missed}: coarser widths overshoot the target)" if missed else "") + ". onnxruntime is the "
            "pickier runtime: its MLAS GEMM packs weight columns in panels of 16, so at batch 32 widths that are "
            "multiples of 8 but not 16 lose a few points there while eager PyTorch (MKL) runs them at full speed "
            "(the GEMM table below: MKL wants multiples of 8).")


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
    ap.add_argument("--align", type=int, default=16, help="vitcc --align for the main comparison (the CLI default)")
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
    ap.add_argument("--sections", default="models,threads,latency,align,micro,breakdown",
                    help="what to run: models (the comparison), threads (DeiT-S at 1, 2 and all threads), latency "
                         "(--target latency), align (the sweep), micro, "
                         "breakdown (torch.profiler time per op category, dense vs compact)")
    ap.add_argument("--breakdown-sparsity", type=float, default=0.5, help="fraction of MACs removed in breakdown")
    ap.add_argument("--breakdown-rounds", type=int, default=25, help="profiled calls per variant in breakdown")
    ap.add_argument("--breakdown-warmup", type=int, default=3)
    ap.add_argument("--thread-counts", default="1,2,all", help="intra-op thread counts of the threads section "
                                                               "('all': os.cpu_count())")
    ap.add_argument("--thread-batches", default="1,8", help="batch sizes of the threads section")
    ap.add_argument("--thread-rounds", type=int, default=11, help="interleaved rounds per batch in the threads section")
    ap.add_argument("--merge", action="store_true", help="keep what this run does not redo from an earlier run")
    ap.add_argument("--out", default=str(HERE / "results" / "latency"), help="path without extension")
    args = ap.parse_args(argv)
    floats = lambda s: [float(v) for v in s.split(",") if v]
    ints = lambda s: [int(v) for v in s.split(",") if v]
    args.sparsities, args.latency_targets = floats(args.sparsities), floats(args.latency_targets)
    args.batches, args.onnx_batches = ints(args.batches), ints(args.onnx_batches)
    args.align_sweep, args.sweep_batches = ints(args.align_sweep), ints(args.sweep_batches)
    args.thread_counts, args.thread_batches = thread_counts(args.thread_counts), ints(args.thread_batches)
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
    with steady_heap(), flushed_subnormals():  # every section times as vitcc times (vitcc.deploy.timing)
        _sections(args, sections, models, data, out, la0, t0)
    _write(data, args, out, la0, t0)
    print(f"wrote {out.with_suffix('.md')} and .json ({time.perf_counter() - t0:.0f}s)")


def _sections(args, sections: set, models: list, data: dict, out: Path, la0: str, t0: float) -> None:
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
        data["align_sweep"] = {**align_sweep(args), "command": _command()}
        _write(data, args, out, la0, t0)
    if "micro" in sections and args.micro:
        data["micro"] = micro(args)
    if "threads" in sections:
        data["threads"] = threads_section(args)
        _write(data, args, out, la0, t0)
    if "breakdown" in sections:
        data.setdefault("breakdown", {})
        for key in models:
            data["breakdown"][key] = breakdown(key, args)
            _write(data, args, out, la0, t0)


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
    flush_subnormals_in_this_process()  # before torch starts a thread, as `vitcc` does
    main()
