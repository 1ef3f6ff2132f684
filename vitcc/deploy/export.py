"""Verified ONNX export: export, check, run in onnxruntime, compare with PyTorch.

Exporter choice (torch 2.14): the dynamo-based exporter (``dynamo=True``, via
torch.export + onnxscript). It handles both plain timm models and torch.fx
GraphModules from symbolic tracing, whereas the legacy TorchScript exporter
crashes on traced GraphModules (the ``is_causal == False`` guards that
``concrete_args`` leave behind hit an internal TorchScript assert). With
``external_data=False`` it writes one self-contained .onnx file (weights
embedded; this caps models at protobuf's 2 GiB). The batch dimension is
requested as dynamic; if the model pins it (e.g. a hard-coded ``view(2, ...)``)
the exporter's draft-export fallback silently specialises it, so we read the
result back from the .onnx inputs and report it as ``dynamic_batch``.

Names and ops are chosen for GPU runtimes (TensorRT, onnxruntime-gpu), which bind
tensors by name: the image input is ``images``, a classifier's one output
``logits``, several outputs are named by their keys (an HF output class, a dict)
or positions (``output_0``, ...). The opset is at least 17, where LayerNorm is one
LayerNormalization op (the fused kernel TensorRT keeps in fp32) instead of a
ReduceMean/Sub/Pow/Sqrt/Div chain.

Two things keep windowed models (Swin) exportable with a dynamic batch:

- The parameters are frozen (``requires_grad=False``) while the exporter runs. It traces
  the model, decomposes the graph and re-runs it (type promotion), and these passes do
  not agree on which tensors require grad. On CPU, SDPA picks its kernel by whether
  ``attn_mask`` requires grad (the flash kernel has no mask gradient), and the two
  kernels return different strides. Swin's mask is its relative position bias, made
  from a parameter, so ``transpose(1, 2).reshape(...)`` after attention was decomposed
  into a view under one kernel and could not be a view under the other ("Cannot view a
  tensor ... (4*s77, 49, ...)"), at any batch. With nothing requiring grad every pass
  picks the same kernel (the one eager inference picks where the mask needs no
  gradient), and reshapes stay views (no copies). Grad mode alone is not enough: a view
  of a parameter requires grad even under ``torch.no_grad()``.
- A batch of one is exported as a batch of two (when the model runs at two). At batch 1
  torch specialises checks such as SDPA's "is the mask's batch 1 or the query's?", and
  the exporter then silently falls back to a static batch.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path, tree_leaves

from vitcc.deploy.timing import onnx_cpu_session
from vitcc.devices import device_of, moved_copy
from vitcc.errors import VerificationError, VitccError
from vitcc.metrics import _eval_mode

__all__ = ["export_onnx"]

MIN_OPSET = 17  # the first with LayerNormalization


def _tensors(inputs) -> list[torch.Tensor]:
    return [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def input_names(module: torch.nn.Module, example_inputs: tuple) -> list[str]:
    """`images` for the one image batch (N, C, H, W) a vision model takes; otherwise forward's parameter names."""
    tensors = _tensors(example_inputs)
    if len(tensors) == 1 and tensors[0].dim() == 4:
        return ["images"]
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= len(tensors) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return params[:len(tensors)]
    return [f"input_{i}" for i in range(len(tensors))]


def output_names(outputs) -> list[str]:
    """A name per output tensor, in the exporter's (pytree's) order: `logits` for a classifier's one output
    (batch, classes), the keys of a dict or an output class (`logits`, `distillation_logits`), else positions."""
    leaves = [(path, t) for path, t in tree_flatten_with_path(outputs)[0] if isinstance(t, torch.Tensor)]
    if len(leaves) == 1 and not any(isinstance(k, (MappingKey, GetAttrKey)) for k in leaves[0][0]):
        return ["logits" if leaves[0][1].dim() == 2 else "output"]
    names = []
    for path, _ in leaves:
        parts = [str(k.key) if isinstance(k, MappingKey) else k.name if isinstance(k, GetAttrKey)
                 else str(k.idx) if isinstance(k, SequenceKey) else str(k) for k in path]
        name = "_".join(parts) or "output"
        names.append(f"output_{name}" if name[0].isdigit() else name)
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(names))]


def _batched(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0


def _with_batch(inputs: tuple, n: int) -> tuple:
    """``inputs`` with every batched tensor cycled along dim 0 to ``n`` rows."""
    return tuple(t[torch.arange(n, device=t.device) % t.shape[0]] if _batched(t) else t for t in inputs)


def _trace_inputs(module, example_inputs: tuple) -> tuple:
    """The inputs to trace with: a batch of one becomes a batch of two, which the exporter can keep dynamic
    (see the module docstring); unchanged if the model does not run at two (it pins its batch)."""
    if not any(_batched(t) for t in example_inputs) or any(_batched(t) and t.shape[0] != 1 for t in example_inputs):
        return example_inputs
    two = _with_batch(example_inputs, 2)
    try:
        with torch.no_grad():
            module(*two)
    except Exception:
        return example_inputs
    return two


@contextmanager
def _frozen(module: torch.nn.Module):
    """Temporarily set requires_grad=False on every parameter, restoring each one's flag."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _export(module, example_inputs: tuple, path: Path, opset: int | None, outputs) -> None:
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} if _batched(t) else None for t in example_inputs)
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise VitccError(f"ONNX export needs torch.onnx.export(dynamo=True), which torch {torch.__version__} "
                         "lacks; install torch >= 2.5 for --onnx")
    # frozen: one SDPA kernel in every pass of the exporter (see the module docstring). Several inputs share
    # the one batch Dim on purpose; the exporter warns that the name clashes with itself
    with _frozen(module), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used.*another axis: batch\.")
        torch.onnx.export(module, _trace_inputs(module, example_inputs), str(path), **accepted(torch.onnx.export, dict(
            dynamo=True, external_data=False, opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False,
            input_names=input_names(module, example_inputs), output_names=output_names(outputs))))


def accepted(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` takes: options that torch versions added later (torch.onnx.export's
    `external_data`, 2.6) are left to their defaults where this torch lacks them."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _read_back(path: Path) -> tuple[int, bool, list[str], list[str]]:
    """(default-domain opset, whether every non-scalar input has a symbolic dim 0, input names, output names)."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input]
    dynamic = all(d[0].dim_param and not d[0].HasField("dim_value") for d in dims if len(d))
    return int(opset), dynamic, [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _random_batch(example_inputs: tuple, dynamic: bool) -> tuple:
    """A fresh batch (one sample larger when the batch is dynamic, to exercise it).

    Float tensors are redrawn from N(0, 1); other tensors (ids, masks) are reused.
    """
    def fresh(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        n = t.shape[0] + 1 if dynamic else t.shape[0]
        t = t[torch.arange(n, device=t.device) % t.shape[0]]
        return torch.randn_like(t) if t.is_floating_point() else t
    return tuple(fresh(t) for t in example_inputs)


def _run_onnxruntime(session: ort.InferenceSession, inputs: tuple) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    arrays = [t.detach().cpu().numpy() for t in _tensors(inputs)]
    if len(names) != len(arrays):
        raise VitccError(f"ONNX model expects {len(names)} inputs, got {len(arrays)} tensors")
    try:
        return session.run(None, dict(zip(names, arrays)))
    except Exception as e:
        raise VitccError(f"onnxruntime failed to run the exported model: {e}") from e


def _compare(got: list[np.ndarray], want: list[torch.Tensor], rtol: float, atol: float) -> float:
    """Max abs error over all outputs; VerificationError if any is not allclose."""
    if len(got) != len(want):
        raise VerificationError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise VerificationError(f"ONNX output shape {g.shape} != PyTorch shape {w.shape}")
        err = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
        worst = max(worst, err)
        if not np.allclose(g, w, rtol=rtol, atol=atol):
            raise VerificationError(f"onnxruntime output differs from PyTorch: max abs error "
                                    f"{err:.3g} (rtol={rtol}, atol={atol})")
    return worst


def export_onnx(module: torch.nn.Module, example_inputs: tuple, path: str | Path, *,
                opset: int | None = None, rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Export ``module`` to ``path`` and verify it with onnx.checker and onnxruntime.

    ``opset`` (default: the exporter's) must be at least 17, so that LayerNorm stays one op. A module on a
    GPU is exported from a CPU copy: onnxruntime checks it on the CPU, against the CPU's float32 rather than
    a GPU's TF32 convolutions, and the file does not depend on where it was made. The module is exported in
    eval mode (its mode is restored afterwards). The onnxruntime (CPU) output is compared with PyTorch's on
    ``example_inputs`` and on one fresh random batch. Everything is written to a temp file next to ``path``
    and renamed only after all checks pass, so a failure never leaves a partial or unverified file behind.
    Export/checker/runtime failures raise VitccError; an output mismatch raises its subclass VerificationError.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VitccError(f"output directory does not exist: {path.parent}")
    if opset is not None and opset < MIN_OPSET:
        raise VitccError(f"ONNX opset {opset} has no LayerNormalization (LayerNorm would be split into "
                         f"ReduceMean ops); use opset {MIN_OPSET} or later")
    if device_of(module).type != "cpu":
        module = moved_copy(module, "cpu")
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
        tmp = Path(tmp_name)
        os.close(fd)
        with _eval_mode(module):
            with torch.no_grad():
                outputs = module(*example_inputs)
            try:
                _export(module, example_inputs, tmp, opset, outputs)
                onnx.checker.check_model(str(tmp), full_check=True)
                opset_used, dynamic, inputs_named, outputs_named = _read_back(tmp)
                session = onnx_cpu_session(tmp)
            except Exception as e:
                raise VitccError(f"ONNX export of {type(module).__name__} failed: {e}") from e

            max_err = 0.0
            for inputs in (example_inputs, _random_batch(example_inputs, dynamic)):
                with torch.no_grad():
                    want = _tensors(module(*inputs))
                got = _run_onnxruntime(session, inputs)
                max_err = max(max_err, _compare(got, want, rtol, atol))
        del session
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "opset": opset_used, "max_abs_error": max_err, "checker": "ok",
            "onnxruntime": "ok", "dynamic_batch": dynamic, "inputs": inputs_named, "outputs": outputs_named}
