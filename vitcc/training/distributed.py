"""torch.distributed glue for fine-tuning under `torchrun --nproc_per_node N`.

No home-made distribution: torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, `init_distributed()`
starts the default process group from them (gloo on CPU; `VITCC_DIST_BACKEND` overrides), training wraps
the model in DistributedDataParallel and the loaders use distributed samplers. Only rank 0 prints and writes.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_distributed", "rank", "world_size", "is_main", "barrier", "launched"]


def launched() -> bool:
    """Started by torchrun (or any launcher that sets RANK and WORLD_SIZE) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group from the launcher's environment, once. True when one is up."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched():
        return False
    dist.init_process_group(backend=backend or os.environ.get("VITCC_DIST_BACKEND", "gloo"))
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
    """Sum a tensor over ranks (in place); identity in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
