"""torch.distributed glue for fine-tuning under `torchrun --nproc_per_node N`, and the device it runs on.

No home-made distribution: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT,
`init_distributed()` starts the default process group from them (gloo on CPU; on GPUs NCCL for CUDA
tensors and gloo for CPU ones; `VITCC_DIST_BACKEND` overrides), training wraps the model in
DistributedDataParallel and the loaders use distributed samplers. Only rank 0 prints and writes.
Every rank of a GPU job uses `cuda:LOCAL_RANK` (`vitcc.devices.resolve_device`), on one node or several.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from vitcc.devices import device_of, launched, moved_copy, to_device

__all__ = ["init_distributed", "is_distributed", "rank", "world_size", "is_main", "barrier", "all_reduce_sum",
           "on_device", "device_copy", "same_device"]


def same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' and 'cuda:N' name one device when N is the current one."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """`module` moved in place to `device` for the block, and back after it. Its Parameter objects stay the
    same (their data moves), so hooks and closures holding them follow: what sparsity training needs."""
    home = device_of(module)
    if device is None or same_device(device, home):
        yield module
        return
    to_device(module, device)  # a captured graph names devices too (arange(device=...)): they move with it
    try:
        yield module
    finally:
        to_device(module, home)


def device_copy(module: nn.Module, device: torch.device | None) -> nn.Module:
    """`module` itself where it already is on `device` (or no device is asked), else a copy there: for work
    that only reads the weights (calibration), so that the program's own tensors never move."""
    if device is None or same_device(device, device_of(module)):
        return module
    return moved_copy(module, device)


def init_distributed(backend: str | None = None, device: torch.device | None = None) -> bool:
    """Initialise the default process group from the launcher's environment, once. True when one is up.

    The backend: `backend`, else `VITCC_DIST_BACKEND`, else gloo, and on a machine with CUDA NCCL for CUDA
    tensors beside gloo for CPU ones (the loss sums and accuracy counts), whichever device trains later:
    loaders made first (`make_loaders(distributed=True)`) start the group before training names its device."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched():
        return False
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    chosen = backend or os.environ.get("VITCC_DIST_BACKEND") or (
        "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=chosen)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity in a single process. A CPU tensor under a CUDA-only
    backend (VITCC_DIST_BACKEND=nccl) goes through the current GPU."""
    if is_distributed():
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
