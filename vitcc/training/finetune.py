"""Fine-tuning and evaluation: AdamW + cosine, optional knowledge distillation, DDP under torchrun, on any
device, in mixed precision, with DeiT's recipe from timm's parts.

`finetune` trains any module in place: a timm model, the compact `torch.fx.GraphModule` a compile emits,
or a model already wrapped in DistributedDataParallel. Method passes use its hooks: `extra_loss(model)`
is added to every step's loss (L1 on gates, ADMM penalties), `on_step(model)` runs after every optimizer
step (projections). Both receive the unwrapped module.

The compact GraphModule is the captured aten graph: parameters are read by get_attr under their
state-dict names and gradients flow through the aten ops (linear, SDPA, layer_norm, ...) as in eager
mode. The model was captured in eval mode, so its train-time behaviour is baked in: dropout nodes carry
`train=False` (aten.dropout(x, p, False)), stochastic depth (timm's DropPath) is not in the graph at all,
and batch norm runs on its running statistics without updating them. `.train()`/`.eval()` set the flag
(DDP and the hooks see it) but change no op. Stochastic depth comes back with `Recipe(drop_path=P)`: a
training copy of the graph with DropPath on every residual branch, sharing the model's parameters
(`vitcc.training.surgery`); the model itself, what evaluation runs and what is saved, never has it.

The recipe (`vitcc.training.recipe.Recipe`, all off by default): mixup/cutmix with soft targets and label
smoothing (timm's Mixup, SoftTargetCrossEntropy, LabelSmoothingCrossEntropy; with a teacher, the teacher
sees the mixed images), linear warmup before the cosine (timm's CosineLRScheduler, per step), an EMA of
the weights (timm's ModelEmaV3: evaluated on `val_loader` every epoch and checkpointed), drop-path.
RandAugment and random erasing belong to the data (`make_loaders(recipe=...)`).

Device and precision: `device` (default: where the model is; the model and teacher are moved there and
stay), `precision` fp32, bf16 or fp16 (torch.autocast, with a GradScaler for fp16; default bf16 on a GPU
that has it, else fp32). Evaluation runs in fp32. The step does not wait for the device: loss and
accuracy are summed on it and read once per epoch (a terminal's live bar reads them twice a second).

Determinism: the same seed gives the same weights on CPU. Every epoch seeds torch's, numpy's and Python's
RNGs (timm's augmentations and Mixup use the latter two) from (seed, epoch, rank), and the shuffle depends
only on (seed, epoch): a RandomSampler's generator is re-seeded per epoch, a DistributedSampler gets `seed`
and `set_epoch`. Reusing a loader object for a second run therefore gives the same order, and resuming
from a checkpoint gives what the uninterrupted run gives.

Distributed: when torch.distributed is initialised with more than one process (see
`vitcc.training.distributed.init_distributed`, called from torchrun's environment), the model is wrapped in
DistributedDataParallel; loss and accuracy are averaged over ranks, only rank 0 prints and writes
checkpoints, and every rank ends with the same weights.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from vitcc.devices import device_of, resolve_device, to_device
from vitcc.frontend import safe_pickle
from vitcc.training.distributed import all_reduce_sum, barrier, init_distributed, is_distributed, is_main, rank, world_size
from vitcc.training.recipe import Recipe, autocast_dtype, resolve_precision
from vitcc.errors import VitccError, raise_if_signalled

__all__ = ["finetune", "evaluate", "distillation_loss", "keep_zeros", "Recipe"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _logits(out) -> Tensor:
    """A model may return (logits, aux...) in training mode (e.g. distilled DeiT): use the first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_labels(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2:
        raise VitccError(f"the model returns shape {tuple(logits.shape)}; fine-tuning and evaluation need "
                         "class logits (batch, classes)")
    _label_check(y, logits.shape[1])


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on logits softened by `temperature`, scaled by T^2 (Hinton et al.)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


def _set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """The epoch's data order, worker seeds and augmentation RNGs: functions of (seed, epoch, rank) only."""
    from timm.utils import random_seed
    random_seed((int(seed) * 1_000_003 + epoch * 7919) % (2**31 - 2**16), rank())
    if loader.generator is not None:  # what the workers' seeds are drawn from
        loader.generator.manual_seed(int(seed) * 1_000_003 + epoch)
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):  # DistributedSampler: its order is (seed, epoch)
        if hasattr(sampler, "seed"):
            sampler.seed = int(seed)
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(int(seed) * 1_000_003 + epoch)


def _unused_parameters(net: nn.Module) -> bool:
    """Does a GraphModule hold trainable parameters its graph never reads? (DDP must then look for them.)

    A captured aten graph reads every parameter through a get_attr node; call_module nodes appear only
    in GraphModules of fx symbolic tracing (a user's own, or a `.pt` of an older vitcc)."""
    if not isinstance(net, fx.GraphModule):
        return False
    used: set[int] = set()
    for n in net.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            try:
                obj = net.get_submodule(n.target) if n.op == "call_module" else _get_attr(net, n.target)
            except AttributeError:
                continue
            if isinstance(obj, nn.Module):
                used.update(id(p) for p in obj.parameters())
            elif isinstance(obj, Tensor):
                used.add(id(obj))
    return any(id(p) not in used for p in net.parameters() if p.requires_grad)


def _get_attr(mod: nn.Module, target: str):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms, gates, position and class tokens are not decayed."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "pos_embed" not in name and "token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise VitccError("the model has no trainable parameters")
    return groups


class _Reporter:
    """One line per epoch (loss, accuracy, images/s, time, time left; validation when given), also when the
    output is not a terminal; on a terminal a live bar above it. Rank 0 only. `progress` may be the rich
    Console to print on (the CLI's own, so that the bar nests under its status line)."""

    def __init__(self, progress, label: str, epochs: int, steps: int, start: int):
        from rich.console import Console
        self.console = progress if isinstance(progress, Console) else Console(stderr=True)
        self.enabled = progress is not None and progress is not False and is_main()
        self.label, self.epochs, self.start = label, epochs, start
        self.bar, self.seen, self.last = None, [], 0.0
        if self.enabled and self.console.is_terminal and epochs > start:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}"),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task(label, total=(epochs - start) * steps, loss=float("nan"), acc=0.0)
            self.bar.start()

    def step(self, epoch: int, sums: Tensor) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        fields = {}
        if now - self.last > 0.5:  # reading the sums waits for the device: twice a second at most
            self.last = now
            loss, correct, n = sums[:3].tolist()
            fields = dict(loss=loss / max(n, 1), acc=correct / max(n, 1))
        self.bar.update(self.task, advance=1, description=f"{self.label} epoch {epoch + 1}/{self.epochs}", **fields)

    def epoch(self, epoch: int, row: dict) -> None:
        self.seen.append(row["seconds"])
        if not self.enabled:
            return
        extra = "".join(f"  {name} {row[k]:.1%}" for k, name in (("val_top1", "val top-1"), ("ema_top1", "ema top-1"))
                        if k in row)
        left = (self.epochs - epoch - 1) * sum(self.seen) / len(self.seen)
        self.console.print(f"{self.label} epoch {epoch + 1}/{self.epochs}  loss {row['loss']:.4f}  acc {row['acc']:.1%}"
                           f"{extra}  {row['images_per_second']:,.0f} img/s  {row['seconds']:.1f}s  "
                           f"left {_duration(left)}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:  # interrupted mid-write: no partial checkpoint stays behind
        tmp.unlink(missing_ok=True)


def _cpu(obj):
    """A state dict (nested) with its tensors on the CPU: checkpoints load on any machine."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _example_image(loader: DataLoader, net: nn.Module) -> Tensor:
    """One input (1, C, H, W) for graph analysis: the recorded input shape, else the data set's first image
    (drawn without touching the RNGs that training uses)."""
    from vitcc.frontend.input_shapes import recorded_meta
    shape = recorded_meta(net).get("input_shape")
    if shape:
        return torch.zeros((1, *tuple(shape)[1:]))
    import random as _random
    state = _random.getstate()
    with torch.random.fork_rng(devices=[]):
        x = loader.dataset[0][0]
    _random.setstate(state)
    return torch.as_tensor(x)[None]


def _label_check(y: Tensor, classes: int) -> None:
    if len(y) and int(y.max()) >= classes:
        raise VitccError(f"the data has class {int(y.max())} but the model has only {classes} outputs; "
                         "use a model with as many classes as the data set (vitcc compile --num-classes N puts a new "
                         "classifier on the compact model)")


def finetune(model: nn.Module, train_loader: DataLoader, *, epochs: int, lr: float = 5e-4,
             teacher: nn.Module | None = None, kd_weight: float = 0.5, temperature: float = 1.0,
             extra_loss: Callable[[nn.Module], Tensor] | None = None,
             on_step: Callable[[nn.Module], None] | None = None, seed: int = 0, weight_decay: float = 0.05,
             checkpoint_dir: str | Path | None = None, progress=True, val_loader: DataLoader | None = None,
             resume: bool = False, recipe: Recipe | None = None, device: str | torch.device | None = None,
             precision: str | None = None, ema=None, label: str = "fine-tune") -> dict:
    """Train `model` in place for `epochs` epochs; returns the history.

    Loss: cross-entropy (soft-target with mixup/cutmix, label-smoothed with `recipe.smoothing`), or with a
    `teacher` `(1 - kd_weight) * that + kd_weight * T^2 * KL(teacher || student)` on logits softened by
    `temperature`; plus `extra_loss(model)` when given. AdamW (weight decay on matrices only), learning rate
    `lr` on a per-step cosine schedule down to 0, after `recipe.warmup_epochs` of linear warmup.
    `ema`: a `timm.utils.ModelEmaV3` of the model to update after every step (one is made when
    `recipe.ema` is set and none is given). `label` names the phase in the progress lines.

    History: `loss` and `acc` (training, per epoch, averaged over ranks; with mixup, accuracy against the
    unmixed labels), `images_per_second` (all ranks), `seconds` per epoch, `val_top1`/`val_top5` (and
    `ema_top1`/`ema_top5`) per epoch when `val_loader` is given; `device`, `precision`, `world_size` and,
    with drop-path, `drop_path_rates` (each branch's rate). With `checkpoint_dir`, rank 0 writes after every
    epoch `epochNNN.pt` (`{"epoch", "model": state dict}`: data only, read with `vitcc evaluate COMPILED
    --weights DIR/epochNNN.pt` or `load_state_dict`), `epochNNN_ema.pt` with an EMA, and `last.pt`
    (optimizer, grad scaler, EMA and history); `resume=True` continues from `last.pt` with the same result as
    an uninterrupted run.
    """
    recipe = recipe if recipe is not None else Recipe()
    if epochs < 0:
        raise VitccError(f"epochs must be >= 0, got {epochs}")
    if not 0.0 <= kd_weight <= 1.0:
        raise VitccError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if temperature <= 0:
        raise VitccError(f"temperature must be positive, got {temperature}")
    if len(train_loader) == 0 and epochs > 0:
        raise VitccError("the training set is empty")
    net = _unwrap(model)
    dev = resolve_device(device) if device is not None else device_of(net)
    prec = resolve_precision(precision, dev)
    init_distributed(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and DDP use the current device
    torch.manual_seed(int(seed))
    if device_of(net) != dev:
        to_device(net, dev)
    if teacher is not None:
        teacher = _unwrap(teacher).eval()
        if device_of(teacher) != dev:
            to_device(teacher, dev)
    history: dict = {"loss": [], "acc": [], "images_per_second": [], "seconds": []}
    if val_loader is not None:
        history.update(val_top1=[], val_top5=[])
    if extra_loss is not None:
        history["extra"] = []
    train_net: nn.Module = net
    if recipe.drop_path > 0:
        from vitcc.training.surgery import drop_path_copy
        train_net, history["drop_path_rates"] = drop_path_copy(net, recipe.drop_path, _example_image(train_loader, net))
    fwd: nn.Module = model
    if is_distributed() and (not isinstance(model, nn.parallel.DistributedDataParallel) or train_net is not net):
        fwd = nn.parallel.DistributedDataParallel(train_net, device_ids=[dev] if dev.type == "cuda" else None,
                                                  find_unused_parameters=_unused_parameters(train_net))
    elif train_net is not net:
        fwd = train_net
    if ema is None and recipe.ema is not None:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=recipe.ema)
    if ema is not None and val_loader is not None:
        history.update(ema_top1=[], ema_top5=[])
    opt = torch.optim.AdamW(_param_groups(net, weight_decay), lr=float(lr))
    steps = len(train_loader)
    total = max(1, epochs * steps)
    warm = min(total - 1, int(round(recipe.warmup_epochs * steps)))
    from timm.scheduler import CosineLRScheduler
    sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=0.0, warmup_t=warm, warmup_lr_init=min(1e-6, lr),
                              warmup_prefix=True, t_in_epochs=False)
    amp = autocast_dtype(prec)
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None
    criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    if recipe.mixes:
        from timm.loss import SoftTargetCrossEntropy
        criterion = SoftTargetCrossEntropy()
    elif recipe.smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy
        criterion = LabelSmoothingCrossEntropy(recipe.smoothing)
    mixup = None
    classes: int | None = None
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and is_main():
        ckpt.mkdir(parents=True, exist_ok=True)
    if resume and ckpt is not None and (ckpt / "last.pt").exists():
        state = safe_pickle.load(ckpt / "last.pt")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        history, start = state["history"], int(state["epoch"])
        sched.step_update(start * steps)
    history.update(device=str(dev), precision=prec, world_size=world_size())
    reporter = _Reporter(progress, label, epochs, steps, start)
    step = start * steps
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            _set_epoch(train_loader, epoch, seed)
            fwd.train()
            sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss * n, correct, n, extra * n
            for x, y in train_loader:
                raise_if_signalled()  # a stop swallowed mid-step ends the run at the next one, not hours later
                on_host = y.device.type == "cpu"
                if classes is not None and on_host:
                    _label_check(y, classes)  # on the host: no wait for the device
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if classes is None and recipe.mixes:  # mixed targets need the class count before the forward
                    classes = _first_batch(net, x, y)
                    from timm.data import Mixup
                    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                                  label_smoothing=recipe.smoothing, num_classes=classes)
                hard = y
                if mixup is not None:
                    if len(x) % 2:  # timm's Mixup pairs images: an odd last batch leaves one out
                        x, y, hard = x[:-1], y[:-1], y[:-1]
                    if len(x) == 0:
                        continue
                    x, target = mixup(x, y)
                else:
                    target = y
                with torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                    logits = _logits(fwd(x))
                    if classes is None:
                        _check_labels(logits, y)  # once: later batches are checked on the host
                        classes = int(logits.shape[1])
                    loss = criterion(logits, target)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = _logits(teacher(x))
                        loss = (1.0 - kd_weight) * loss + kd_weight * distillation_loss(
                            logits.float(), t_logits.float(), temperature)
                    extra = None
                    if extra_loss is not None:
                        extra = extra_loss(net)
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                step += 1
                sched.step_update(step)
                if on_step is not None:
                    with torch.no_grad():
                        on_step(net)
                if ema is not None:
                    ema.update(net, step=step)
                with torch.no_grad():
                    n = len(hard)
                    sums[0] += loss.detach().double() * n
                    sums[1] += (logits.detach().argmax(1) == hard).sum()
                    sums[2] += n
                    if extra is not None:
                        sums[3] += extra.detach().double() * n
                reporter.step(epoch, sums)
            totals = sums.cpu()
            all_reduce_sum(totals)
            seen = max(totals[2].item(), 1)
            row = {"loss": totals[0].item() / seen, "acc": totals[1].item() / seen,
                   "images_per_second": totals[2].item() / max(time.perf_counter() - t0, 1e-9)}
            if extra_loss is not None:
                row["extra"] = totals[3].item() / seen
            if val_loader is not None:
                ev = evaluate(net, val_loader)
                row.update(val_top1=ev["top1"], val_top5=ev["top5"])
                if ema is not None:
                    ev = evaluate(ema.module, val_loader)
                    row.update(ema_top1=ev["top1"], ema_top5=ev["top5"])
            row["seconds"] = time.perf_counter() - t0
            for k, v in row.items():
                history[k].append(v)
            reporter.epoch(epoch, row)
            if ckpt is not None and is_main():
                net.eval()
                weights = _cpu(net.state_dict())
                _save_atomic({"epoch": epoch + 1, "model": weights}, ckpt / f"epoch{epoch + 1:03d}.pt")
                ema_weights = _cpu(ema.module.state_dict()) if ema is not None else None
                if ema_weights is not None:
                    _save_atomic({"epoch": epoch + 1, "model": ema_weights}, ckpt / f"epoch{epoch + 1:03d}_ema.pt")
                _save_atomic({"epoch": epoch + 1, "model": weights, "optimizer": _cpu(opt.state_dict()),
                              "scaler": scaler.state_dict() if scaler is not None else None, "ema": ema_weights,
                              "history": history, "seed": int(seed)}, ckpt / "last.pt")
            if ckpt is not None:
                barrier()
    finally:
        reporter.close()
    net.eval()
    return history


def _first_batch(net: nn.Module, x: Tensor, y: Tensor) -> int:
    """The model's class count (a forward of one image, in eval mode), checked against the first labels."""
    with torch.no_grad():
        out = _logits(_eval_forward(net, x[:1]))
    _check_labels(out, y)
    return int(out.shape[1])


def _eval_forward(net: nn.Module, x: Tensor):
    was = net.training
    net.eval()
    try:
        return net(x)
    finally:
        net.train(was)


def keep_zeros(masks: dict[str, Tensor]) -> Callable[[nn.Module], None]:
    """`on_step` for `finetune` that re-applies weight masks (parameter name -> bool mask, True = kept)
    after every optimizer step, so weights pruned by masking stay zero while the rest train."""
    def hook(model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, m in masks.items():
            p = params.get(name)
            if p is not None and p.shape == m.shape:
                p.mul_(m.to(device=p.device, dtype=p.dtype))
    return hook


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) and the number of images `n`.

    With a sharded loader (make_loaders(distributed=True) under torchrun) the counts are summed over
    ranks, so every rank returns the figures of the whole validation set.
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    device = device_of(net)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    checked, classes = False, 0
    try:
        for x, y in loader:
            if checked and y.device.type == "cpu" and len(y):
                _label_check(y, classes)  # on the host; the device is not waited for until the end
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = _logits(net(x))
            if not checked:
                _check_labels(logits, y)
                classes, checked = logits.shape[1], True
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (top[:, 0] == y).sum()
            counts[1] += (top == y[:, None]).any(1).sum()
            counts[2] += len(y)
    finally:
        net.train(was_training)
    counts = counts.cpu()
    from torch.utils.data.distributed import DistributedSampler

    from vitcc.training.data import ShardSampler
    if isinstance(loader.sampler, (ShardSampler, DistributedSampler)):
        all_reduce_sum(counts)
    n = int(counts[2].item())
    return {"top1": counts[0].item() / max(n, 1), "top5": counts[1].item() / max(n, 1), "n": n}
