"""Compile every model the core issue names, at S = 0.3 and 0.5, each group kind alone and all together,
with timm's fused attention on and off; record the verified error. Results: benchmarks/results/model_matrix.md.

    python benchmarks/model_matrix.py [--quick [--full a,b]] [--models a,b]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import timm
import torch

import vitcc

MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "deit_tiny_patch16_224",
          "deit_small_patch16_224", "deit_base_patch16_224", "deit_tiny_distilled_patch16_224",
          "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_medium_patch16_gap_256"]
KIND_SETS = ["residual", "heads", "head_dim", "mlp", "residual,heads,head_dim,mlp"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="all kinds together only")
    ap.add_argument("--full", default="deit_tiny_patch16_224", help="models that get every kind alone too")
    ap.add_argument("--out", default="benchmarks/results/model_matrix")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        # dinov2 ships without a classifier: give it one so its residual stream is not the model output
        kw = {"num_classes": 1000} if "dinov2" in name else {}
        base = timm.create_model(name, pretrained=False, **kw).eval()
        x = torch.randn(1, *base.pretrained_cfg["input_size"])
        full = not args.quick or name in args.full.split(",")
        for fused in (True, False):
            for mod in base.modules():
                if hasattr(mod, "fused_attn"):
                    mod.fused_attn = fused
            for s in (0.3, 0.5):
                for kinds in (KIND_SETS if full else KIND_SETS[-1:]):
                    start = time.perf_counter()
                    try:
                        r = vitcc.compile(base, "magnitude", sparsity=s, prune=kinds, example_inputs=(x,))
                        rep = r.report
                        row = dict(model=name, fused=fused, sparsity=s, prune=kinds, status="verified",
                                   params=rep["params_after"] / rep["params_before"],
                                   macs=rep["macs_after"] / rep["macs_before"], max_abs_error=rep["max_abs_error"],
                                   max_rel_error=rep["max_rel_error"], frozen=len(rep["frozen"]))
                    except Exception as e:  # recorded, never hidden
                        row = dict(model=name, fused=fused, sparsity=s, prune=kinds, status=f"FAILED: {e}")
                    row["seconds"] = round(time.perf_counter() - start, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    write(rows, args)


def write(rows, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ok = sum(r["status"] == "verified" for r in rows)
    lines = [f"# Model matrix: {ok}/{len(rows)} compiles verified", "",
             f"Command: `python {' '.join(sys.argv)}`  ", f"Date: {datetime.date.today()}, torch {torch.__version__}, "
             f"timm {timm.__version__}, {platform.machine()}", "",
             "| model | fused | S | prune | status | params kept | MACs kept | max abs err | max rel err | frozen | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] == "verified":
            lines.append(f"| {r['model']} | {r['fused']} | {r['sparsity']} | {r['prune']} | verified | {r['params']:.3f} "
                         f"| {r['macs']:.3f} | {r['max_abs_error']:.2e} | {r['max_rel_error']:.2e} | {r['frozen']} "
                         f"| {r['seconds']} |")
        else:
            lines.append(f"| {r['model']} | {r['fused']} | {r['sparsity']} | {r['prune']} | {r['status']} "
                         f"| | | | | | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
