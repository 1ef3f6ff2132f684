"""Cost metrics for models before/after compilation: parameters, MACs, latency."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "count_graph_macs", "latency_ms", "macs_counter"]

_aten = torch.ops.aten

# FlopCounterMode (torch 2.14) knows the CUDA SDPA kernels (flash / efficient /
# cuDNN) but not the CPU one: on CPU F.scaled_dot_product_attention dispatches to
# aten._scaled_dot_product_flash_attention_for_cpu, which is counted as 0 FLOPs.
# We map it to torch's own SDPA formula (2*b*h*Sq*Sk*(d + d_v), i.e. exactly the
# QK^T and AV bmm's of the unfused path), so fused and unfused attention agree.
def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {
    getattr(_aten, name): _sdpa_flop
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(_aten, name)
}


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Temporarily switch to eval mode (dropout off), restoring the caller's mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def macs_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the CPU SDPA formula: what every MAC figure of vitcc is counted with."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameter elements; shared (tied) parameters are counted once."""
    unique = {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


def count_macs(module: torch.nn.Module, example_inputs: tuple) -> int:
    """Multiply-accumulates of one eval-mode forward pass (= FLOPs // 2).

    Counts what torch's FlopCounterMode counts: matmuls (mm/addmm/bmm/baddbmm),
    convolutions and scaled-dot-product attention (fused kernels included, on CPU
    via the extra formula above). Element-wise ops, norms and softmax are not
    counted, as is conventional for MAC figures. Works for any callable module,
    including torch.fx GraphModules.
    """
    counter = macs_counter()
    with _eval_mode(module), torch.no_grad(), counter:
        module(*example_inputs)
    return counter.get_total_flops() // 2


class _OnMeta(fx.Interpreter):
    """Runs a graph on the meta device: its parameters and buffers become meta tensors as they are read."""

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        return value.to("meta") if isinstance(value, torch.Tensor) else value


def count_graph_macs(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """`count_macs` of a captured graph, counted on the meta device: the counter sees the kernels a run
    dispatches, with shapes and no arithmetic (0.1 s for a ViT-B where a forward takes 0.4). A graph that
    reads tensor values (`item`, data-dependent sizes) or has an op without a meta kernel is run for real."""
    counter = macs_counter()
    meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
    try:
        with torch.no_grad(), counter:
            _OnMeta(gm).run(*meta_inputs)
    except Exception:  # noqa: BLE001 - any op meta cannot run: count a real run instead
        return count_macs(gm, example_inputs)
    return counter.get_total_flops() // 2


def latency_ms(module: torch.nn.Module, example_inputs: tuple, *, warmup: int = 3,
               repeats: int = 10) -> float:
    """Median wall time (ms) of ``module(*example_inputs)`` under inference_mode.

    The median is robust to the occasional scheduler hiccup; CUDA work is
    synchronised so the timing covers the kernels, not just their launch.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with _eval_mode(module), torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            module(*example_inputs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))
