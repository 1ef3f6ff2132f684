"""Devices: what `--device` names, float32 arithmetic exact enough to compare on any device, and the one line
for running out of device memory. A leaf: it imports only torch and vitcc.errors."""
from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator

import torch

from .errors import VitccError

DEVICE_HELP = "cpu, cuda or cuda:N (default: cpu; under torchrun: cuda, each process on cuda:LOCAL_RANK)"
_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device, refused (VitccError, exit 2) where it cannot run: before
    any model is loaded or file written, so a typo or a machine without a GPU costs one line, not a traceback
    minutes later. Under torchrun 'cuda' is `cuda:LOCAL_RANK`: one GPU per process, as NCCL needs."""
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
    if launched():
        local = os.environ.get("LOCAL_RANK", "0")
        if index is not None and int(index) != int(local):  # its own device, named, is what 'cuda' resolves to
            raise VitccError(f"--device {spec}: under torchrun every process uses cuda:LOCAL_RANK; pass --device cuda")
        index = local
        if int(index) >= count:
            raise VitccError(f"torchrun started process {index} on a node with {count} CUDA device(s); start at most "
                             f"{count} processes per node (--nproc_per_node {count})")
    elif index is not None and int(index) >= count:
        raise VitccError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                         "pick one of them")
    return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())


def _tensor_attributes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every tensor held as a plain attribute (a captured graph's lifted constants),
    which Module.to does not move."""
    return [(m, k, v) for m in module.modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)]


def _retarget(module: torch.nn.Module, device: torch.device) -> None:
    """Every device a captured graph names (`_assert_tensor_metadata(device=...)`, `arange(device=...)`,
    `_to_copy(device=...)`: torch.export records the device the model was captured on) becomes `device`."""
    import torch.fx as fx
    from torch.fx.node import map_aggregate

    swap = lambda a: device if isinstance(a, torch.device) and a != device else a
    for gm in (m for m in module.modules() if isinstance(m, fx.GraphModule)):
        changed = False
        for n in gm.graph.nodes:
            args, kwargs = map_aggregate(n.args, swap), map_aggregate(n.kwargs, swap)
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs, changed = args, kwargs, True
        if changed:
            gm.recompile()


def to_device(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`module` moved to `device` in place, and returned: parameters, buffers, tensors held as plain attributes,
    and (in a captured graph) every device the graph names, so a program captured on one device runs on
    another (a program runs on one device)."""
    device = torch.device(device)
    module.to(device)
    for owner, name, t in _tensor_attributes(module):
        if t.device != device:
            setattr(owner, name, t.to(device))
    _retarget(module, device)
    return module


def moved_copy(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A copy of `module` on `device`, its tensors copied straight there (a GPU model's CPU copy costs no
    GPU memory), the graph's devices retargeted as in `to_device`."""
    import copy
    device = torch.device(device)
    memo: dict[int, torch.Tensor] = {}
    tensors = [*module.parameters(), *module.buffers(), *(t for _, _, t in _tensor_attributes(module))]
    for t in tensors:
        if id(t) not in memo:
            new = t.detach().to(device, copy=True)
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
    out = copy.deepcopy(module, memo)
    _retarget(out, device)
    return out


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors are (its first parameter or buffer; the CPU for a module without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _precision_handles() -> list | None:
    """The fp32_precision settings of torch >= 2.9 (generic, cuBLAS, cuDNN, oneDNN) this torch has, or None
    before them."""
    b = torch.backends
    mkldnn = getattr(b, "mkldnn", None)
    candidates = [b, getattr(b.cuda, "matmul", None), b.cudnn, getattr(b.cudnn, "conv", None),
                  getattr(b.cudnn, "rnn", None), mkldnn, getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None),
                  getattr(mkldnn, "rnn", None)]
    handles = []
    for h in candidates:
        try:
            if h is not None and isinstance(h.fp32_precision, str):
                handles.append(h)
        except (AttributeError, RuntimeError):
            continue
    return handles if b in handles and getattr(b.cuda, "matmul", None) in handles else None


_EXACT_LEGACY = {"matmul_precision": "highest", "cudnn_allow_tf32": False}


def _legacy_flags() -> dict[str, object]:
    """torch's legacy reduced-precision flags that it lets us read (name -> value): it refuses where the
    caller's new settings disagree with one; that one is left alone (the new settings, made exact, agree with
    it again)."""
    readers = {"matmul_precision": torch.get_float32_matmul_precision,
               "cudnn_allow_tf32": lambda: torch.backends.cudnn.allow_tf32}
    out = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except RuntimeError:
            pass
    return out


def _set_legacy_flags(flags: dict[str, object]) -> None:
    if "matmul_precision" in flags:
        torch.set_float32_matmul_precision(flags["matmul_precision"])
    if "cudnn_allow_tf32" in flags:
        torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (no TF32 on a GPU, no bf16 passes in oneDNN), the
    settings restored after: verify's bound (1e-4 relative) holds on a GPU only without TF32, which cuDNN
    uses for convolutions by default. torch >= 2.9 keeps its legacy flags (allow_tf32,
    float32_matmul_precision) beside the new ones and refuses to read them once the two disagree (what reads
    them then fails: torch.compile, a user's `torch.set_float32_matmul_precision("high")` followed by a cuBLAS
    matmul): so both are set, the legacy ones where torch lets them be read."""
    handles = _precision_handles() or []  # (none before torch 2.9: the legacy flags are all there is)
    saved = [h.fp32_precision for h in handles]
    legacy = _legacy_flags()
    try:  # the legacy flags first: their setters write some of the new settings too
        _set_legacy_flags({k: v for k, v in _EXACT_LEGACY.items() if k in legacy})
        for h in handles:
            h.fp32_precision = "ieee"
        yield
    finally:
        _set_legacy_flags(legacy)
        for h, v in reversed(list(zip(handles, saved))):
            h.fp32_precision = v


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


def out_of_memory(exc: BaseException) -> BaseException | None:
    """The device's out-of-memory error behind `exc` (itself, or what it was raised from or while handling:
    a pass failure, a verification that could not run), else None; not behind an error raised `from None`,
    which already said what happened."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OutOfMemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return None


@contextlib.contextmanager
def failure_as_line(say: Callable[[BaseException], str]) -> Iterator[None]:
    """Turn a failure inside into one VitccError line, `say(error)`; except a device out of memory, which goes
    on to `memory_hint` to say what to lower (wrapped here, it would read as a model that does not run)."""
    try:
        yield
    except Exception as e:
        if out_of_memory(e) is not None:
            raise
        raise VitccError(say(e)) from None


@contextlib.contextmanager
def memory_hint(lower: str) -> Iterator[None]:
    """Turn a device's out-of-memory error inside (however it was wrapped) into one VitccError line (exit 2)
    naming what to lower."""
    try:
        yield
    except Exception as e:
        oom = out_of_memory(e)
        if oom is None:
            raise
        raise VitccError(out_of_memory_line(oom, lower)) from None


def launched() -> bool:
    """Started by torchrun (RANK and WORLD_SIZE set) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
