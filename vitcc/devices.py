"""Devices: what `--device` names, float32 arithmetic exact enough to compare on any device, and the one line
for running out of device memory. A leaf: it imports only torch and vitcc.errors."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from .errors import VitccError

DEVICE_HELP = "cpu, cuda or cuda:N (default: cpu)"
_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device, refused (VitccError, exit 2) where it cannot run: before
    any model is loaded or file written, so a typo or a machine without a GPU costs one line, not a traceback
    minutes later."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "cpu").strip().lower()
    m = _SPEC.match(text)
    if m is None:
        raise VitccError(f"unknown --device {spec!r}; use {DEVICE_HELP}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise VitccError(f"--device {spec}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise VitccError(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'not built'}); use --device cpu, or run on a machine with a GPU")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise VitccError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                         "pick one of them")
    return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors are (its first parameter or buffer; the CPU for a module without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _precision_handles() -> list | None:
    """The fp32_precision settings of torch >= 2.9 (generic, cuBLAS, cuDNN, oneDNN), or None before them."""
    b = torch.backends
    handles = [b, getattr(b.cuda, "matmul", None), b.cudnn, getattr(b.cudnn, "conv", None),
               getattr(b.cudnn, "rnn", None), getattr(b, "mkldnn", None), getattr(getattr(b, "mkldnn", None), "matmul", None),
               getattr(getattr(b, "mkldnn", None), "conv", None), getattr(getattr(b, "mkldnn", None), "rnn", None)]
    handles = [h for h in handles if h is not None]
    try:
        return handles if all(isinstance(h.fp32_precision, str) for h in handles) else None
    except (AttributeError, RuntimeError):
        return None


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (no TF32 on a GPU, no bf16 passes in oneDNN), the
    settings restored after: verify's bound (1e-4 relative) holds on a GPU only without TF32, which cuDNN
    uses for convolutions by default. torch >= 2.9 refuses to read its legacy flags (allow_tf32,
    float32_matmul_precision) once the new ones were set, so each torch is driven through its own API."""
    handles = _precision_handles()
    if handles is not None:
        saved = [h.fp32_precision for h in handles]
        try:
            for h in handles:
                h.fp32_precision = "ieee"
            yield
        finally:
            for h, v in reversed(list(zip(handles, saved))):
                h.fp32_precision = v
        return
    saved_legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                    torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_legacy[:2]
        torch.set_float32_matmul_precision(saved_legacy[2])


OutOfMemoryError: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def out_of_memory_line(exc: BaseException, lower: str) -> str:
    """One line for a device that ran out of memory: which device, and what to lower (`lower` names the
    command's own options, e.g. '--batch')."""
    m = re.search(r"GPU (\d+)", str(exc))
    where = f"cuda:{m.group(1)}" if m else "the device"
    total = ""
    if m and torch.cuda.is_available():
        try:
            total = f" ({torch.cuda.get_device_properties(int(m.group(1))).total_memory / 2**30:.0f} GiB)"
        except Exception:  # noqa: BLE001 - the line must come out even if the device is in a bad state
            total = ""
    return f"out of memory on {where}{total}; lower {lower}, or run with --device cpu"


@contextlib.contextmanager
def memory_hint(lower: str) -> Iterator[None]:
    """Turn a device's out-of-memory error inside into one VitccError line (exit 2) naming what to lower."""
    try:
        yield
    except OutOfMemoryError as e:
        raise VitccError(out_of_memory_line(e, lower)) from None
