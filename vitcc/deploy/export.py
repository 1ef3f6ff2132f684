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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils._pytree import tree_leaves

from vitcc.errors import VerificationError, VitccError
from vitcc.metrics import _eval_mode

__all__ = ["export_onnx"]


def _tensors(inputs) -> list[torch.Tensor]:
    return [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def _export(module, example_inputs: tuple, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() else None
                           for t in example_inputs)
    torch.onnx.export(module, example_inputs, str(path), dynamo=True, external_data=False,
                      opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False)


def _read_back(path: Path) -> tuple[int, bool]:
    """(default-domain opset, whether every non-scalar input has a symbolic dim 0)."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input]
    dynamic = all(d[0].dim_param and not d[0].HasField("dim_value") for d in dims if len(d))
    return int(opset), dynamic


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

    The module is exported in eval mode (its mode is restored afterwards). The
    onnxruntime (CPU) output is compared with PyTorch's on ``example_inputs`` and
    on one fresh random batch. Everything is written to a temp file next to
    ``path`` and renamed only after all checks pass, so a failure never leaves a
    partial or unverified file behind. Export/checker/runtime failures raise
    VitccError; an output mismatch raises its subclass VerificationError.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VitccError(f"output directory does not exist: {path.parent}")
    example_inputs = tuple(example_inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _eval_mode(module):
            try:
                _export(module, example_inputs, tmp, opset)
                onnx.checker.check_model(str(tmp), full_check=True)
                opset_used, dynamic = _read_back(tmp)
                session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
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
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "opset": opset_used, "max_abs_error": max_err,
            "checker": "ok", "onnxruntime": "ok", "dynamic_batch": dynamic}
