"""Compile-time benchmark: vitcc's whole compile vs Torch-Pruning's DependencyGraph + prune, interleaved.

For ViT-Ti/S/B (width) and ViT-S at depth 6/12/24/48 (depth), at one sparsity, each repeat runs vitcc and
then Torch-Pruning on freshly built models of the same seed (so both see the same machine load), and records
wall-clock and process-CPU seconds:

* vitcc: the whole `vitcc.compile(model, "magnitude", sparsity=s)` call, split by `on_pass` into
  *capture* (from the call to the first pass: torch.export, unlift, shapes, the working copy), *passes*
  (analyze, magnitude, select, rewrite, fold, dce, verify: each as `report["passes"]` has it) and *after*
  (the report: parameter counts, the groups' JSON). verify is the equivalence check on every compile.
* Torch-Pruning (if installed): `tp.pruner.MetaPruner(...)` construction, which builds the
  DependencyGraph by tracing the model, and `pruner.step()`, timed separately.

The aims (issue 11): vitcc's whole compile <= TP's total on ViT-B, vitcc's passes <= half of it, and time
linear in depth (a least-squares line through the depth rows, with its largest relative residual).

Torch-Pruning is set up as in its timm ViT example (examples/transformers/prune_timm_vit.py):
`num_heads={attn.qkv: attn.num_heads}`, timm `Attention.forward` replaced by one that reshapes with
-1 instead of a fixed width, the classifier head ignored, and num_heads/head_dim written back to the
attention modules after pruning. To match vitcc's uniform pruning of the residual stream, heads,
head dims and MLP hidden units, it prunes heads and head dims (`prune_num_heads=True,
prune_head_dims=True, head_pruning_ratio=pruning_ratio=s`) with a group L2 magnitude importance.
Fused attention: the DependencyGraph is built with `fused_attn=False` (TP's timm examples set
TIMM_FUSED_ATTN=0); the replacement forward passes `scale=self.scale` to SDPA so that, after head
dims are pruned, fused and unfused attention still compute the same function (SDPA's default scale
would become 1/sqrt(pruned head_dim)). After pruning the TP model is run with both paths as a check.

Usage:  python benchmarks/compile_time.py [--quick] [--threads 1] [--sparsity 0.5] [--repeats 3]
Writes benchmarks/results/compile_time.md and .json (see --out).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata as md
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vitcc
from vitcc.metrics import count_macs, count_params

try:
    import torch_pruning as tp
except Exception:  # not installed (or broken): its columns become n/a
    tp = None

PASSES = ["analyze", "magnitude", "select", "rewrite", "fold", "dce", "verify"]
PARTS = ["capture", "passes", "after"]  # of vitcc's compile call, in order
WIDTH = [("ViT-Ti", "vit_tiny_patch16_224", {}),
         ("ViT-S", "vit_small_patch16_224", {}),
         ("ViT-B", "vit_base_patch16_224", {})]
DEPTHS = [6, 12, 24, 48]
HERE = Path(__file__).resolve().parent


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _make(name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------- vitcc

def run_vitcc(model: torch.nn.Module, x: torch.Tensor, sparsity: float) -> dict:
    """Wall and process-CPU seconds of one whole compile, split at the first pass's start and the last's end."""
    marks: dict[str, tuple[float, float]] = {}
    cpu: dict[str, float] = {}

    def on_pass(p, phase):
        now = (time.perf_counter(), time.process_time())
        marks.setdefault("first", now)
        marks["last"] = now
        cpu[p.name] = now[1] - cpu[p.name] if phase == "end" else now[1]

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    r = vitcc.compile(model, "magnitude", sparsity=sparsity, example_inputs=(x,), on_pass=on_pass)
    t1, c1 = time.perf_counter(), time.process_time()
    (f_wall, f_cpu), (l_wall, l_cpu) = marks["first"], marks["last"]
    passes = {p["name"]: p["seconds"] for p in r.report["passes"]}
    rep = r.report
    return {"capture": f_wall - t0, "passes": l_wall - f_wall, "after": t1 - l_wall, "total": t1 - t0,
            **{p: passes.get(p) for p in PASSES},
            "cpu": {"capture": f_cpu - c0, "passes": l_cpu - f_cpu, "after": c1 - l_cpu, "total": c1 - c0,
                    **{p: cpu.get(p) for p in PASSES}},
            "params_before": rep["params_before"], "params_after": rep["params_after"],
            "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
            "max_abs_error": rep.get("max_abs_error"), "widths": rep.get("widths")}


# ------------------------------------------------------------------------------- Torch-Pruning

def _tp_attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm Attention.forward that works after its widths were pruned (and keeps its scale)."""
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.attn_drop.p if self.training else 0.0,
                                             scale=self.scale)
    else:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("benchmark forward: masks are not used by these ViTs")
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.attn_drop(attn) @ v
    out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _attentions(model):
    from timm.models.vision_transformer import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


def run_tp(model: torch.nn.Module, x: torch.Tensor, sparsity: float, round_to: int | None,
           check: bool) -> dict:
    attns = _attentions(model)
    num_heads = {}
    for a in attns:
        a.forward = _tp_attention_forward.__get__(a, type(a))
        a.fused_attn = False  # trace the explicit matmul/softmax path
        num_heads[a.qkv] = a.num_heads
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unwrapped parameters detected: cls_token, pos_embed"
        pruner = tp.pruner.MetaPruner(
            model, x, importance=imp, pruning_ratio=sparsity, global_pruning=False,
            ignored_layers=[model.head], num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=True, head_pruning_ratio=sparsity, round_to=round_to)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    pruner.step()
    step, step_cpu = time.perf_counter() - t0, time.process_time() - c0
    for a in attns:  # write the pruned widths back (not timed; a few attribute stores)
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
    out = {"build": build, "step": step, "total": build + step,
           "cpu": {"build": build_cpu, "step": step_cpu, "total": build_cpu + step_cpu},
           "params_after": count_params(model)}
    if check:
        try:
            with torch.no_grad():
                y_unfused = model(x)
                for a in attns:
                    a.fused_attn = True
                y_fused = model(x)
            out.update(runs=bool(torch.isfinite(y_unfused).all()) and tuple(y_unfused.shape) == (1, 1000),
                       fused_vs_unfused=float((y_fused - y_unfused).abs().max()),
                       macs_after=count_macs(model, (x,)),
                       heads=attns[0].num_heads, head_dim=attns[0].head_dim,
                       embed_dim=int(model.cls_token.shape[-1]), mlp_hidden=model.blocks[0].mlp.fc1.out_features)
        except Exception as e:
            out.update(runs=False, run_error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return out


def tp_mlp_only_ignored(model: torch.nn.Module) -> list:
    """What Torch-Pruning must leave alone to prune a timm Swin with no model code: its relative-position-bias
    table is indexed by head, which TP does not follow, and its residual pruning breaks the stage norms, so
    only MLP neurons are pruned (classifier, patch embedding, window attention and patch merging ignored)."""
    head = model.head.fc if hasattr(model.head, "fc") else model.head
    ignored = [head, model.patch_embed.proj]
    for m in model.modules():
        if type(m).__name__ == "WindowAttention":
            ignored += [m.qkv, m.proj]
        elif type(m).__name__ == "PatchMerging":
            ignored.append(m.reduction)
    return ignored


def tp_mlp_pruner(model: torch.nn.Module, x: torch.Tensor, ratio: float, importance=None):
    """Torch-Pruning's MetaPruner on MLP neurons only (`tp_mlp_only_ignored`); group magnitude by default."""
    import warnings
    imp = importance or tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, global_pruning=False,
                                    ignored_layers=tp_mlp_only_ignored(model))


# --------------------------------------------------------------------------------------- driver

def bench_case(label, name, kwargs, args, repeats) -> dict:
    """`repeats` rounds of vitcc then Torch-Pruning on models built with the round's seed."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    res = {"label": label, "model": name, "kwargs": kwargs, "repeats": repeats, "vitcc": [], "tp": []}
    use_tp = tp is not None and not args.no_tp
    for i in range(repeats):
        if "vitcc_error" not in res:
            try:
                res["vitcc"].append(run_vitcc(_make(name, kwargs, i), x, args.sparsity))
            except Exception as e:
                res["vitcc_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        if use_tp and "tp_error" not in res:
            try:
                res["tp"].append(run_tp(_make(name, kwargs, i), x, args.sparsity, args.round_to,
                                        check=(i == repeats - 1)))
            except Exception as e:
                res["tp_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc()
    keys_v = [*PARTS, *PASSES, "total"]
    keys_t = ("build", "step", "total")
    res["vitcc_median"] = {k: _median([r[k] for r in res["vitcc"]]) for k in keys_v} if res["vitcc"] else None
    res["tp_median"] = {k: _median([r[k] for r in res["tp"]]) for k in keys_t} if res["tp"] else None
    res["vitcc_cpu_median"] = ({k: _median([r["cpu"][k] for r in res["vitcc"]]) for k in keys_v}
                               if res["vitcc"] else None)
    res["tp_cpu_median"] = {k: _median([r["cpu"][k] for r in res["tp"]]) for k in keys_t} if res["tp"] else None
    pairs = list(zip(res["vitcc"], res["tp"]))  # same round, same load: the ratios are taken per round
    res["ratios"] = {clock: {f"{k}/tp": _median([(v[k] if clock == "wall" else v["cpu"][k])
                                                 / (t["total"] if clock == "wall" else t["cpu"]["total"])
                                                 for v, t in pairs]) for k in ("total", "passes")}
                     for clock in ("wall", "cpu")} if pairs else None
    if res["vitcc"]:
        last = res["vitcc"][-1]
        res["info"] = {k: last[k] for k in ("params_before", "params_after", "macs_before", "macs_after",
                                            "max_abs_error", "widths")}
    if res["tp"]:
        res["tp_info"] = {k: v for k, v in res["tp"][-1].items() if k not in ("build", "step", "total", "cpu")}
    return res


def depth_fit(rows: list[dict], key: str = "vitcc_cpu_median", part: str = "total") -> dict | None:
    """Least-squares line seconds = a + b * depth through the depth rows, and its worst relative residual."""
    pts = [(r["kwargs"]["depth"], (r.get(key) or {}).get(part)) for r in rows]
    pts = [(d, t) for d, t in pts if t is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    md, mt = sum(d for d, _ in pts) / n, sum(t for _, t in pts) / n
    b = sum((d - md) * (t - mt) for d, t in pts) / sum((d - md) ** 2 for d, _ in pts)
    a = mt - b * md
    return {"intercept": a, "per_block": b,
            "max_rel_residual": max(abs(t - (a + b * d)) / t for d, t in pts), "points": pts}


def _warmup(args):
    """One small compile and one small TP prune, untimed, so lazy imports/inits are not billed."""
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    m = _make("vit_tiny_patch16_224", kw, 0)
    x = torch.randn(1, 3, 32, 32)
    vitcc.compile(m, "magnitude", sparsity=args.sparsity, example_inputs=(x,))
    if tp is not None and not args.no_tp:
        m = _make("vit_tiny_patch16_224", kw, 0)
        run_tp(m, x, args.sparsity, args.round_to, check=False)


def _loadavg():
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return None


def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _m(v):
    return "n/a" if v is None else f"{v / 1e6:.2f}M"


def render_aims(width_rows: list[dict], depth_rows: list[dict]) -> list[str]:
    """Issue 11's three aims, each with the figure that decides it (process CPU and wall-clock)."""
    L = ["## The aims\n", "| aim | process CPU | wall-clock | met |", "|---|---:|---:|---|"]
    vit_b = next((r for r in width_rows if r["label"] == "ViT-B"), None)
    ratios = (vit_b or {}).get("ratios") or {}
    for what, key, limit in (("ViT-B: whole compile <= Torch-Pruning (vitcc / TP)", "total/tp", 1.0),
                             ("ViT-B: passes <= half of Torch-Pruning (passes / TP)", "passes/tp", 0.5)):
        cpu, wall = (ratios.get(c, {}).get(key) for c in ("cpu", "wall"))
        if wall is not None:
            L.append(f"| {what} | {_fmt(cpu, 2)} | {wall:.2f} | {'yes' if wall <= limit else '**no**'} |")
    fit = depth_fit(depth_rows, "vitcc_cpu_median", "total")
    wall_fit = depth_fit(depth_rows, "vitcc_median", "total")
    if fit:
        L.append(f"| linear in depth (largest relative residual of a line through depths "
                 f"{', '.join(str(d) for d, _ in fit['points'])}) | {fit['max_rel_residual']:.1%} | "
                 f"{wall_fit['max_rel_residual']:.1%} | {'yes' if wall_fit['max_rel_residual'] <= 0.1 else '**no**'} |")
    L.append("\nRatios are medians of per-round ratios (vitcc and Torch-Pruning run back to back in each round). "
             "Judged on wall-clock time, what a user waits for (process CPU time adds up every thread's time). "
             "Linear: within 10% of a straight line at every depth.\n")
    return L


def render(meta, width_rows, depth_rows) -> str:
    L = []
    L.append("# Compile time: vitcc's whole compile vs Torch-Pruning\n")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}")
    L.append(f"- versions: torch {meta['torch']}, timm {meta['timm']}, torch-pruning {meta['torch_pruning']}, "
             f"vitcc {meta['vitcc']}, python {meta['python']}")
    L.append(f"- machine: {meta['machine']}, nproc={meta['nproc']} (shared with other work, so timings "
             f"are noisy), torch threads={meta['threads']}, CPU, batch 1x3x224x224, fp32")
    L.append(f"- sparsity {meta['sparsity']}; {meta['repeats']} rounds per model, each vitcc then Torch-Pruning "
             "on freshly built models of the round's seed (interleaved: both see the same load); medians over "
             "rounds, and ratios as the median of the per-round ratios; one small untimed warm-up first.")
    L.append("- vitcc's columns split its one `vitcc.compile` call (via `on_pass`): capture = from the call to "
             "the first pass (torch.export, unlift, shapes from export's records, the working copy); passes = "
             "first pass start to last pass end (every pass, verify included, and the manager's checks); after = "
             "the report. Process-CPU times (`time.process_time()`) are less disturbed by other work on the "
             "shared cores than wall-clock ones, but caches and memory bandwidth are still shared.")
    if meta.get("loadavg"):
        L.append(f"- load average (1/5/15 min) at start: {meta['loadavg'][0]}, at end: {meta['loadavg'][1]}")
    if meta["torch_pruning"] == "not installed":
        L.append("- Torch-Pruning is not installed (`pip install --no-deps torch-pruning`): its columns are n/a.")
    L.append("")
    L.append("**Note:** vitcc's total includes capture (torch.export of the model) and `verify`, the equivalence "
             "check that runs the compact model and the masked original on two inputs and compares their "
             "outputs and residual streams; Torch-Pruning checks nothing. Its build includes its own tracing "
             "(an autograd-graph walk). MACs are torch.utils.flop_counter's counts (the compact model's on verify's run "
             "of it, the original's on the meta device: shapes, no arithmetic, in vitcc's *after*). The masked "
             "original computes each Linear's kept rows from its kept columns, the same values with the compact "
             "model's GEMM sizes, so verify costs about four compact-sized runs (two inputs, two sides) plus the "
             "reference's full-size attention, norms and adds.\n")
    L.append("Torch-Pruning setup (following its timm ViT example, own code): `MetaPruner(model, x, "
             "GroupMagnitudeImportance(p=2, group_reduction='sum', normalizer=None), pruning_ratio=s, "
             "global_pruning=False, ignored_layers=[model.head], num_heads={attn.qkv: attn.num_heads}, "
             f"prune_num_heads=True, prune_head_dims=True, head_pruning_ratio=s, round_to={meta['round_to']})`, "
             "timm Attention.forward replaced by one that reshapes with -1 and passes `scale=self.scale` to SDPA; "
             "DependencyGraph built with `fused_attn=False`; num_heads/head_dim/attn_dim written back after "
             "`step()`. vitcc: `vitcc.compile(model, 'magnitude', sparsity=s)` (defaults: uniform, all group "
             "kinds residual/heads/head_dim/mlp, align=1).\n")
    L.extend(render_aims(width_rows, depth_rows))
    for title, rows in (("Width: ViT-Ti / ViT-S / ViT-B", width_rows),
                        ("Depth: vit_small_patch16_224 with depth=N", depth_rows)):
        if not rows:
            continue
        L.append(f"## {title}\n")
        for clock, vkey, tkey in (("process CPU", "vitcc_cpu_median", "tp_cpu_median"),
                                  ("wall-clock", "vitcc_median", "tp_median")):
            rk = "cpu" if clock == "process CPU" else "wall"
            L.append(f"### Side by side, {clock} seconds\n")
            L.append("| model | params | n | vitcc total | capture | passes | after | TP build (DepGraph+MetaPruner) "
                     "| TP step | TP total | vitcc/TP | passes/TP | params after vitcc | params after TP "
                     "| TP model runs |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for r in rows:
                v, t = r.get(vkey) or {}, r.get(tkey) or {}
                ratio = (r.get("ratios") or {}).get(rk, {})
                info, ti = r.get("info", {}), r.get("tp_info", {})
                runs = "n/a"
                if "tp_error" in r:
                    runs = f"TP failed: {r['tp_error'][:80]}"
                elif "runs" in ti:
                    runs = "yes" if ti["runs"] else f"NO ({ti.get('run_error', 'non-finite/bad shape')[:80]})"
                L.append(f"| {r['label']} | {_m(info.get('params_before'))} | {r['repeats']} "
                         f"| {_fmt(v.get('total'))} | {_fmt(v.get('capture'))} | {_fmt(v.get('passes'))} "
                         f"| {_fmt(v.get('after'))} | {_fmt(t.get('build'))} | {_fmt(t.get('step'))} "
                         f"| {_fmt(t.get('total'))} | {_fmt(ratio.get('total/tp'), 2)} "
                         f"| {_fmt(ratio.get('passes/tp'), 2)} | {_m(info.get('params_after'))} "
                         f"| {_m(ti.get('params_after'))} | {runs} |")
            L.append("")
        L.append("### vitcc per pass, process CPU seconds\n")
        L.append("| model | capture | " + " | ".join(PASSES) + " | after | total |")
        L.append("|---|" + "---:|" * (len(PASSES) + 3))
        for r in rows:
            v = r.get("vitcc_cpu_median") or {}
            L.append(f"| {r['label']} | {_fmt(v.get('capture'))} | " + " | ".join(_fmt(v.get(p)) for p in PASSES)
                     + f" | {_fmt(v.get('after'))} | {_fmt(v.get('total'))} |")
        L.append("")
        if rows is depth_rows:
            L.append("### Growth with depth (least squares, process CPU)\n")
            L.append("| what | seconds at depth 0 | seconds per block | largest relative residual |")
            L.append("|---|---:|---:|---:|")
            for what, key, part in (("vitcc total", "vitcc_cpu_median", "total"),
                                    ("vitcc capture", "vitcc_cpu_median", "capture"),
                                    ("vitcc passes", "vitcc_cpu_median", "passes"),
                                    ("Torch-Pruning total", "tp_cpu_median", "total")):
                fit = depth_fit(rows, key, part)
                if fit:
                    L.append(f"| {what} | {fit['intercept']:.3f} | {fit['per_block']:.4f} "
                             f"| {fit['max_rel_residual']:.1%} |")
            L.append("")
    notes = []
    for r in width_rows + depth_rows:
        ti = r.get("tp_info", {})
        if "vitcc_error" in r:
            notes.append(f"- {r['label']}: vitcc failed: {r['vitcc_error']}")
        if "tp_error" in r:
            notes.append(f"- {r['label']}: Torch-Pruning failed: {r['tp_error']}")
        if ti.get("runs") is False:
            notes.append(f"- {r['label']}: the Torch-Pruning-pruned model did not run: {ti.get('run_error')}")
        if r.get("info", {}).get("params_after") and ti.get("params_after") \
                and r["info"]["params_after"] != ti["params_after"]:
            h = (r["info"].get("widths") or {}).get("heads")
            vh = f"{h['after'] / h['groups']:g}" if h and h.get("groups") else "?"
            notes.append(f"- {r['label']}: params after differ: vitcc {r['info']['params_after']:,} vs "
                         f"TP {ti['params_after']:,} (heads kept per block: vitcc {vh}, TP {ti.get('heads')})")
    L.append("## Checks\n")
    for r in width_rows + depth_rows:
        info, ti = r.get("info", {}), r.get("tp_info", {})
        err = info.get("max_abs_error")
        line = (f"- {r['label']}: vitcc max |compact - masked| = {'n/a' if err is None else format(err, '.2e')}, "
                f"MACs {_m(info.get('macs_before'))} -> {_m(info.get('macs_after'))}")
        if ti:
            line += (f"; TP MACs after {_m(ti.get('macs_after'))}, heads/block {ti.get('heads')}, head_dim "
                     f"{ti.get('head_dim')}, embed {ti.get('embed_dim')}, mlp {ti.get('mlp_hidden')}, "
                     "TP model fused vs unfused attention max diff "
                     + ("n/a" if ti.get("fused_vs_unfused") is None else format(ti["fused_vs_unfused"], ".2e")))
        L.append(line)
    if notes:
        L.append("\nNotable:\n")
        L.extend(notes)
    L.append("")
    L.append("Where parameter counts agree, vitcc and Torch-Pruning reach the same widths, but they do not keep the "
             "same channels (their group-magnitude definitions differ, e.g. in which biases/norm/embedding "
             "parameters count), so the two pruned models are not expected to agree numerically.")
    L.append("")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ViT-Ti and depths 6, 12, 24 only, 1 round")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per model (vitcc then TP in each)")
    ap.add_argument("--only", default=None, help="comma-separated row labels to run (e.g. ViT-B,'depth 24')")
    ap.add_argument("--round-to", type=int, default=None, help="Torch-Pruning round_to (vitcc align=1)")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning even if installed")
    ap.add_argument("--out", default=str(HERE / "results" / "compile_time"),
                    help="output path without extension (.md and .json are written)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    width = WIDTH[:1] if args.quick else WIDTH
    depths = DEPTHS[:3] if args.quick else DEPTHS
    if args.quick:
        args.repeats = 1
    _warmup(args)

    cache: dict[tuple, dict] = {}

    def case(label, name, kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            reps = args.repeats
            t0 = time.perf_counter()
            cache[key] = bench_case(label, name, kwargs, args, reps)
            v, t = cache[key]["vitcc_cpu_median"] or {}, cache[key]["tp_cpu_median"] or {}
            ratio = ((cache[key].get("ratios") or {}).get("cpu") or {}).get("total/tp")
            print(f"{label:10s} n={reps} CPU s: vitcc {_fmt(v.get('total'))} (passes {_fmt(v.get('passes'))})  "
                  f"TP {_fmt(t.get('total'))}  vitcc/TP {_fmt(ratio, 2)}  (case wall {time.perf_counter() - t0:.1f}s)",
                  flush=True)
        return {**cache[key], "label": label}

    load0 = _loadavg()
    t_start = time.perf_counter()
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    width_rows = [case(label, name, kw) for label, name, kw in width if only is None or label in only]
    depth_rows = [case(f"depth {d}", "vit_small_patch16_224", {"depth": d}) for d in depths
                  if only is None or f"depth {d}" in only]

    meta = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "timm": timm.__version__,
        "torch_pruning": _version("torch-pruning") if tp is not None else "not installed",
        "vitcc": getattr(vitcc, "__version__", "?"), "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "nproc": os.cpu_count(),
        "threads": args.threads, "sparsity": args.sparsity, "repeats": args.repeats, "round_to": args.round_to,
        "quick": args.quick, "wall_seconds": time.perf_counter() - t_start, "loadavg": [load0, _loadavg()],
    }
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
        if model_name:
            meta["machine"] += f" ({model_name})"
    except OSError:
        pass
    try:
        meta["nproc"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    data = {"meta": meta, "width": width_rows, "depth": depth_rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    out.with_suffix(".json").write_text(text + "\n")
    md_text = render(meta, width_rows, depth_rows)
    md_text += (f"\n## Raw JSON\n\nAlso in `{out.with_suffix('.json').name}`.\n\n<details><summary>raw JSON"
                f"</summary>\n\n```json\n{text}\n```\n\n</details>\n")
    out.with_suffix(".md").write_text(md_text)
    print(f"wrote {out.with_suffix('.md')} and .json ({meta['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
