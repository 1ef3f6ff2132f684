"""Fine-tuning and evaluation: AdamW + cosine, optional knowledge distillation, DDP under torchrun.

`finetune` trains any module in place: a timm model, the compact `torch.fx.GraphModule` a compile emits,
or a model already wrapped in DistributedDataParallel. Method passes use its hooks: `extra_loss(model)`
is added to every step's loss (L1 on gates, ADMM penalties), `on_step(model)` runs after every optimizer
step (projections). Both receive the unwrapped module.

The compact GraphModule is the captured aten graph: parameters are read by get_attr under their
state-dict names and gradients flow through the aten ops (linear, SDPA, layer_norm, ...) as in eager
mode. The model was captured in eval mode, so its train-time behaviour is baked in: dropout nodes carry
`train=False` (aten.dropout(x, p, False)), stochastic depth (timm's DropPath) is not in the graph at all,
and batch norm runs on its running statistics without updating them. `.train()`/`.eval()` set the flag
(DDP and the hooks see it) but change no op: fine-tuning a compact model is without dropout or drop-path
regularisation and with frozen norm statistics, hence deterministic given the seed and data order; an eager
model (a timm model passed here) trains with its own dropout.

Determinism: the same seed gives the same weights on CPU. The seed fixes torch's global RNG (dropout,
init of anything created during training) and the shuffle of each epoch, which depends only on
(seed, epoch): a RandomSampler's generator is re-seeded per epoch, a DistributedSampler gets
`seed` and `set_epoch`. Reusing a loader object for a second run therefore gives the same order.

Distributed: when torch.distributed is initialised with more than one process (see
`vitcc.training.distributed.init_distributed`, called from torchrun's environment), the model is wrapped in
DistributedDataParallel; loss and accuracy are averaged over ranks, only rank 0 prints and writes
checkpoints, and every rank ends with the same weights.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from vitcc.frontend import safe_pickle
from vitcc.training.distributed import all_reduce_sum, barrier, init_distributed, is_distributed, is_main
from vitcc.errors import VitccError

__all__ = ["finetune", "evaluate", "distillation_loss"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _logits(out) -> Tensor:
    """A model may return (logits, aux...) in training mode (e.g. distilled DeiT): use the first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check_labels(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2:
        raise VitccError(f"the model returns shape {tuple(logits.shape)}; fine-tuning and evaluation need "
                         "class logits (batch, classes)")
    if len(y) and int(y.max()) >= logits.shape[1]:
        raise VitccError(f"the data has class {int(y.max())} but the model has only {logits.shape[1]} outputs; "
                         "use a model with at least as many classes as the data set")


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on logits softened by `temperature`, scaled by T^2 (Hinton et al.)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


def _set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
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
    """Rich progress bar with the epoch's running loss and accuracy on a terminal, and one line per epoch
    (with validation accuracy when given); rank 0 only."""

    def __init__(self, enabled: bool, epochs: int, steps: int):
        from rich.console import Console
        self.console = Console(stderr=True)
        self.enabled = enabled and is_main()
        self.bar = None
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}"),
                                TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task("fine-tune", total=epochs * steps, loss=float("nan"), acc=0.0)
            self.bar.start()
        self.epochs = epochs

    def step(self, epoch: int, loss: float, acc: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"epoch {epoch + 1}/{self.epochs}", loss=loss, acc=acc)

    def epoch(self, epoch: int, row: dict) -> None:
        if self.enabled:  # above the bar on a terminal, one line per epoch in logs
            extra = "".join(f"  {k} {row[k]:.1%}" for k in ("val_top1", "val_top5") if k in row)
            self.console.print(f"epoch {epoch + 1}/{self.epochs}  loss {row['loss']:.4f}  acc {row['acc']:.1%}"
                               f"{extra}  {row['seconds']:.1f}s", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:  # interrupted mid-write: no partial checkpoint stays behind
        tmp.unlink(missing_ok=True)


def finetune(model: nn.Module, train_loader: DataLoader, *, epochs: int, lr: float = 5e-4,
             teacher: nn.Module | None = None, kd_weight: float = 0.5, temperature: float = 1.0,
             extra_loss: Callable[[nn.Module], Tensor] | None = None,
             on_step: Callable[[nn.Module], None] | None = None, seed: int = 0, weight_decay: float = 0.05,
             checkpoint_dir: str | Path | None = None, progress: bool = True, val_loader: DataLoader | None = None,
             resume: bool = False) -> dict:
    """Train `model` in place for `epochs` epochs; returns the history.

    Loss: cross-entropy, or with a `teacher` `(1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student)`
    on logits softened by `temperature`; plus `extra_loss(model)` when given. AdamW (weight decay on
    matrices only), learning rate `lr` on a per-step cosine schedule down to 0.

    History: `loss` and `acc` (training, per epoch, averaged over ranks), `val_top1`/`val_top5` per epoch
    when `val_loader` is given, `seconds` per epoch. With `checkpoint_dir`, rank 0 writes after every epoch
    `epochNNN.pt` (`{"epoch", "model": state dict}`: data only, read with `vitcc evaluate COMPILED --weights
    DIR/epochNNN.pt` or `load_state_dict`) and `last.pt` (optimizer, schedule, RNG and history); `resume=True`
    continues from `last.pt` with the same result as an uninterrupted run.
    """
    if epochs < 0:
        raise VitccError(f"epochs must be >= 0, got {epochs}")
    if not 0.0 <= kd_weight <= 1.0:
        raise VitccError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if temperature <= 0:
        raise VitccError(f"temperature must be positive, got {temperature}")
    if len(train_loader) == 0 and epochs > 0:
        raise VitccError("the training set is empty")
    torch.manual_seed(int(seed))
    init_distributed()
    net = _unwrap(model)
    device = _device(net)
    fwd: nn.Module = model
    if is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
        fwd = nn.parallel.DistributedDataParallel(net, find_unused_parameters=_unused_parameters(net))
    if teacher is not None:
        teacher = _unwrap(teacher).eval()
    opt = torch.optim.AdamW(_param_groups(net, weight_decay), lr=float(lr))
    steps = len(train_loader)
    total = max(1, epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
    history: dict = {"loss": [], "acc": [], "seconds": []}
    if val_loader is not None:
        history.update(val_top1=[], val_top5=[])
    if extra_loss is not None:
        history["extra"] = []
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and is_main():
        ckpt.mkdir(parents=True, exist_ok=True)
    if resume and ckpt is not None and (ckpt / "last.pt").exists():
        state = safe_pickle.load(ckpt / "last.pt")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], int(state["epoch"])
        torch.set_rng_state(state["rng"])
    reporter = _Reporter(progress, epochs, steps)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            _set_epoch(train_loader, epoch, seed)
            fwd.train()
            sums = torch.zeros(4, dtype=torch.float64)  # loss * n, correct, n, extra * n
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                logits = _logits(fwd(x))
                _check_labels(logits, y)
                loss = F.cross_entropy(logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = _logits(teacher(x))
                    loss = (1.0 - kd_weight) * loss + kd_weight * distillation_loss(logits, t_logits, temperature)
                extra = None
                if extra_loss is not None:
                    extra = extra_loss(net)
                    loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if on_step is not None:
                    with torch.no_grad():
                        on_step(net)
                n = len(y)
                correct = (logits.detach().argmax(1) == y).sum().item()
                sums += torch.tensor([loss.item() * n, correct, n, float(extra.item()) * n if extra is not None else 0.0],
                                     dtype=torch.float64)
                reporter.step(epoch, sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item())
            all_reduce_sum(sums)
            row = {"loss": sums[0].item() / max(sums[2].item(), 1), "acc": sums[1].item() / max(sums[2].item(), 1)}
            if extra_loss is not None:
                row["extra"] = sums[3].item() / max(sums[2].item(), 1)
            if val_loader is not None:
                ev = evaluate(net, val_loader)
                row.update(val_top1=ev["top1"], val_top5=ev["top5"])
            row["seconds"] = time.perf_counter() - t0
            for k, v in row.items():
                history[k].append(v)
            reporter.epoch(epoch, row)
            if ckpt is not None and is_main():
                net.eval()
                _save_atomic({"epoch": epoch + 1, "model": net.state_dict()}, ckpt / f"epoch{epoch + 1:03d}.pt")
                _save_atomic({"epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "history": history, "rng": torch.get_rng_state(),
                              "seed": int(seed)}, ckpt / "last.pt")
            if ckpt is not None:
                barrier()
    finally:
        reporter.close()
    net.eval()
    return history


def keep_zeros(masks: dict[str, Tensor]) -> Callable[[nn.Module], None]:
    """`on_step` for `finetune` that re-applies weight masks (parameter name -> bool mask, True = kept)
    after every optimizer step, so weights pruned by masking stay zero while the rest train."""
    def hook(model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, m in masks.items():
            p = params.get(name)
            if p is not None and p.shape == m.shape:
                p.mul_(m.to(p.dtype))
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
    device = _device(net)
    counts = torch.zeros(3, dtype=torch.float64)
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = _logits(net(x))
            _check_labels(logits, y)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(1).sum().item(), len(y)],
                                   dtype=torch.float64)
    finally:
        net.train(was_training)
    from torch.utils.data.distributed import DistributedSampler

    from vitcc.training.data import ShardSampler
    if isinstance(loader.sampler, (ShardSampler, DistributedSampler)):
        all_reduce_sum(counts)
    n = int(counts[2].item())
    return {"top1": counts[0].item() / max(n, 1), "top5": counts[1].item() / max(n, 1), "n": n}
