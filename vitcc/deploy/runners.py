"""How a model runs where it is served: eager PyTorch, one CUDA graph replay, or torch.compile; in float32, or
in bf16/fp16 with its weights and inputs cast (as served). `vitcc bench`, the latency tables
(vitcc.profiling) and benchmarks/gpu.py time models through these, so all of them run models the same way.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch

from vitcc.errors import VitccError

MODES = ("eager", "cudagraph", "compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")

__all__ = ["MODES", "DTYPES", "COMPILE_MODES", "parse_modes", "parse_dtype", "check_mode", "as_dtype", "make_runner",
           "compile_settings"]


def parse_modes(text: str) -> list[str]:
    out = [m.strip().lower() for m in text.split(",") if m.strip()]
    out = ["cudagraph" if m in ("cuda-graph", "cudagraphs", "graph") else m for m in out]
    if not out or set(out) - set(MODES):
        raise VitccError(f"bad --mode {text!r}: use eager, cudagraph or compile (comma-separated for several)")
    return list(dict.fromkeys(out))


def parse_dtype(text: str) -> torch.dtype:
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise VitccError(f"bad --dtype {text!r}: use fp32, bf16 or fp16")
    return dtype


def check_mode(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """What a device cannot run, refused before any work."""
    if mode == "cudagraph" and device.type != "cuda":
        raise VitccError(f"--mode cudagraph replays a CUDA graph and needs --device cuda (the device is {device})")
    if dtype == torch.float16 and device.type == "cpu":
        raise VitccError("--dtype fp16 runs on a GPU; on --device cpu use fp32 or bf16")


def as_dtype(model: torch.nn.Module, inputs: tuple, dtype: torch.dtype | None) -> tuple[torch.nn.Module, tuple]:
    """The model and inputs in `dtype`, as served (weights and floating inputs cast; a copy, the model given is
    left as it is); unchanged for None or where they are in `dtype` already."""
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if dtype is None or all(t.dtype == dtype for t in floating):
        model_out = model
    else:
        model_out = copy.deepcopy(model).to(dtype)
    cast = tuple(x.to(dtype) if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in inputs)
    return model_out, cast


@contextlib.contextmanager
def compile_settings() -> Any:
    """torch.compile keyed on static shapes, with room for every (model, batch) a bench compiles: dynamo's
    per-function cache (8 entries) would otherwise fall back to eager for the dense models, whose classes
    share one forward, without a word. Restored after."""
    import torch._dynamo.config as cfg
    names = [n for n in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit") if hasattr(cfg, n)]
    saved = {n: getattr(cfg, n) for n in names}
    try:
        for n in names:
            setattr(cfg, n, max(saved[n], 256))
        yield
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def make_runner(model: torch.nn.Module, inputs: tuple, mode: str, dtype: torch.dtype | None = None, *,
                device: torch.device | None = None, compile_mode: str = "default") -> Callable[[], Any]:
    """A function of no arguments that runs `model` on `inputs` once in `mode`, ready to time: a compiled
    model is compiled and a CUDA graph captured here, not in the first timed call. With `dtype`, a copy of the
    model and the inputs cast to it run (`as_dtype`)."""
    device = torch.device(device) if device is not None else inputs[0].device
    check_mode(mode, device, dtype or torch.float32)
    model, inputs = as_dtype(model, inputs, dtype)
    model.eval()
    if mode == "eager":
        def run():
            with torch.inference_mode():
                return model(*inputs)
        return run
    if mode == "compile":
        compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

        def run():
            with torch.inference_mode():
                return compiled(*inputs)
        run()  # compiles (and autotunes) here
        return run
    return _cuda_graph(model, inputs, device)


def _cuda_graph(model: torch.nn.Module, inputs: tuple, device: torch.device) -> Callable[[], Any]:
    """One CUDA graph of the whole forward on static inputs (warmed up on a side stream, as capture needs)."""
    static = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                model(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # captured on `side`, a stream of this device (torch.cuda.graph's own stream is made once per process,
        # on whichever GPU was current then)
        with torch.inference_mode(), torch.cuda.graph(graph, stream=side):
            out = model(*static)

    def run():
        graph.replay()
        return out
    # the graph reads `static` and the weights of `model` (a cast copy, maybe, that nothing else holds): they
    # live as long as the runner, or a replay would read memory handed to other tensors
    run.graph_reads = (model, static)
    return run
