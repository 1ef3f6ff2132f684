"""Fine-tuning speed: vitcc's training step on a compact model against timm's on a native model of its shape.

DeiT-S pruned to half its residual width, heads and MLP (head dims kept) has exactly DeiT-Tiny's shape (192
wide, 3 heads of 64, MLP 768; ../shared/GPU.md). This script trains that compact GraphModule with
`vitcc.training.finetune.finetune` and timm's own DeiT-Tiny (`timm.create_model("deit_tiny_patch16_224")`)
with the training step of timm's train.py (timm's AdamW from `create_optimizer_v2`, its cosine scheduler
per update, autocast, NativeScaler-style GradScaler for fp16, timm's Mixup and losses, drop-path built into
the model), on the same device, precision and batch, in one process, interleaved: each window trains each
side for `--steps` steps (a fresh optimizer each time, on both sides), the first window is warm-up, and the
figures are medians over the rest. The timm loop reads no loss back per step (train.py's `loss.item()`
logging is left out): the stronger baseline.

Both sides read the same loader: `--pool` batches of random images made once (pinned on a GPU) and served
round-robin, so the figures are the training step, not image decoding. Rows:

- plain: cross-entropy, no augmentation;
- recipe: mixup 0.8, cutmix 1.0, label smoothing 0.1, drop-path 0.1 (vitcc: on the compact graph's
  residual branches, 0 at the first to 0.1 at the last; timm: its per-block rule);
- distill: plain plus knowledge distillation from the unpruned DeiT-S (both sides run the same teacher).

Usage:
    python benchmarks/finetune_speed.py                       # CPU, fp32, batch 8 (a few minutes on 2 cores)
    python benchmarks/finetune_speed.py --device cuda         # GPU, bf16, batch 256, rows plain,recipe,distill
Writes benchmarks/results/finetune_speed.md and .json (`--out` changes the path) with the command.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, Dataset

import vitcc
from vitcc.metrics import count_params
from vitcc.devices import resolve_device
from vitcc.training.finetune import distillation_loss, finetune
from vitcc.training.recipe import Recipe, autocast_dtype, resolve_precision

HERE = Path(__file__).resolve().parent
ROWS = {
    "plain": dict(recipe=Recipe(), distill=False),
    "recipe": dict(recipe=Recipe(mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1), distill=False),
    "distill": dict(recipe=Recipe(), distill=True),
}


class Batches(Dataset):
    """`length` ready batches (images, labels), served round-robin from a small pool made once."""

    def __init__(self, pool: list[tuple[torch.Tensor, torch.Tensor]], length: int):
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)]


def make_pool(n: int, batch: int, size: int, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(n):
        x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        pool.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return pool


def loader_of(pool, steps: int) -> DataLoader:
    return DataLoader(Batches(pool, steps), batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(0))


def compact_deit_tiny(size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(DeiT-S pruned to DeiT-Tiny's shape by vitcc, the unpruned DeiT-S) on the CPU."""
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=size).eval()
    res = vitcc.compile(dense, "magnitude", sparsity=0.5, prune="residual,heads,mlp", target="channels", align=1,
                        example_inputs=(torch.randn(1, 3, size, size),))
    return res.module, dense


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timm_window(model, loader, device, precision, recipe: Recipe, teacher, lr: float) -> float:
    """timm train.py's step for one pass over `loader`; images/s of the loop (the setup is not timed)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=len(loader), lr_min=0.0, t_in_epochs=False)
    mixup = (Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                   num_classes=1000) if recipe.mixes else None)
    criterion = (SoftTargetCrossEntropy() if mixup is not None else
                 LabelSmoothingCrossEntropy(recipe.smoothing) if recipe.smoothing > 0 else torch.nn.CrossEntropyLoss())
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    amp = autocast_dtype(precision)
    model.train()
    sync(device)
    t0, n, updates = time.perf_counter(), 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            out = model(x)
            loss = criterion(out, y)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = 0.5 * loss + 0.5 * distillation_loss(out.float(), t_out.float())
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        updates += 1
        sched.step_update(num_updates=updates)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def vitcc_window(model, loader, device, precision, recipe: Recipe, teacher, lr: float) -> float:
    """`vitcc.training.finetune.finetune` for one epoch over `loader`; its own images/s (the epoch loop)."""
    h = finetune(model, loader, epochs=1, lr=lr, teacher=teacher, device=device, precision=precision, recipe=recipe,
                 progress=False)
    return h["images_per_second"][0]


def run_row(name: str, compact, native, teacher, pool, args, device, precision) -> dict:
    spec = ROWS[name]
    recipe: Recipe = spec["recipe"]
    native = copy.deepcopy(native)
    if recipe.drop_path > 0:  # timm's own stochastic depth: the per-block rule of its constructor
        native = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=args.size,
                                   drop_path_rate=recipe.drop_path)
    native.to(device)
    mine = copy.deepcopy(compact)
    t = teacher if spec["distill"] else None
    loader = loader_of(pool, args.steps)
    vit, tim = [], []
    for w in range(args.windows + 1):
        sides = [("vitcc", vitcc_window, mine, vit), ("timm", timm_window, native, tim)]
        for label, fn, model, out in (sides if w % 2 == 0 else sides[::-1]):
            ips = fn(model, loader, device, precision, recipe, t, args.lr)
            if w > 0:  # the first window warms both up
                out.append(ips)
    v, n = statistics.median(vit), statistics.median(tim)
    row = {"row": name, "recipe": recipe.to_json(), "distill": spec["distill"], "vitcc_images_per_second": v,
           "timm_images_per_second": n, "ratio": v / n, "vitcc_windows": vit, "timm_windows": tim}
    print(f"{name:8s} vitcc {v:9.1f} img/s   timm {n:9.1f} img/s   ratio {v / n:.1%}", flush=True)
    return row


def render(meta: dict, rows: list[dict]) -> str:
    L = ["# Fine-tuning speed: vitcc's compact DeiT-S (DeiT-Tiny's shape) against timm's DeiT-Tiny\n"]
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}; device: {meta['device_name']}; precision {meta['precision']}; batch "
             f"{meta['batch']}; image {meta['size']}x{meta['size']}; {meta['steps']} steps per window, "
             f"{meta['windows']} timed windows after one warm-up, interleaved, medians; torch threads "
             f"{meta['threads']}; load average at start/end {meta['load'][0]} / {meta['load'][1]}")
    L.append(f"- versions: torch {meta['torch']}, timm {meta['timm']}, vitcc {meta['vitcc']}")
    L.append(f"- models: compact {meta['params_compact']:,} parameters, timm DeiT-Tiny {meta['params_native']:,}; "
             f"compile {meta['compile_seconds']:.1f} s\n")
    L.append("| row | vitcc finetune (img/s) | timm train step (img/s) | ratio | vitcc windows | timm windows |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        L.append(f"| {r['row']} | {r['vitcc_images_per_second']:,.1f} | {r['timm_images_per_second']:,.1f} | "
                 f"**{r['ratio']:.1%}** | {', '.join(f'{v:,.0f}' for v in r['vitcc_windows'])} | "
                 f"{', '.join(f'{v:,.0f}' for v in r['timm_windows'])} |")
    L.append("\nThe aim is a ratio of at least 95%. Rows: plain (cross-entropy), recipe (mixup 0.8, cutmix 1.0, "
             "smoothing 0.1, drop-path 0.1), distill (KD from the unpruned DeiT-S, same teacher on both sides). "
             "vitcc's figure is finetune's own images/s of each epoch (its setup: optimizer, drop-path copy, not "
             "timed, as the timm loop's is not).")
    return "\n".join(L) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: bf16 on a GPU that has it, else fp32)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per window (default: 20 on a GPU, 4 on the CPU)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per side (after one warm-up)")
    ap.add_argument("--size", type=int, default=224, help="image size")
    ap.add_argument("--pool", type=int, default=4, help="distinct batches the loader serves round-robin")
    ap.add_argument("--rows", default=None, help="comma list of plain,recipe,distill (default: plain,recipe on the "
                    "CPU, all three on a GPU)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--out", default=str(HERE / "results" / "finetune_speed"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    args.batch = args.batch or (256 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 4)
    rows = (args.rows or ("plain,recipe,distill" if gpu else "plain,recipe")).split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; use {', '.join(ROWS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = " ".join(f"{v:.1f}" for v in os.getloadavg())
    t0 = time.perf_counter()
    compact, dense = compact_deit_tiny(args.size)
    compile_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    native = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=args.size)
    if count_params(compact) != count_params(native):
        sys.exit(f"the compact model has {count_params(compact):,} parameters, DeiT-Tiny {count_params(native):,}: "
                 "not the same shape")
    teacher = dense.to(device).eval()
    pool = make_pool(args.pool, args.batch, args.size, pin=gpu)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cores)", "precision": precision, "batch": args.batch, "size": args.size,
            "steps": args.steps, "windows": args.windows, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "vitcc": vitcc.__version__,
            "params_compact": count_params(compact), "params_native": count_params(native),
            "compile_seconds": compile_seconds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in rows:  # written after each row: a run stopped by a timeout keeps the rows it finished
        results.append(run_row(name, compact, native, teacher, pool, args, device, precision))
        meta.update(wall_seconds=time.perf_counter() - t0, load=(load0, " ".join(f"{v:.1f}" for v in os.getloadavg())))
        out.with_suffix(".md").write_text(render(meta, results))
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print(f"wrote {out.with_suffix('.md')} in {meta['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
