"""Capture: torch.export turns any PyTorch model into the aten-level graph every pass works on.

The exported program is unlifted into a plain `torch.fx.GraphModule` (parameters and buffers under their
state-dict names, reached by get_attr) so passes can slice tensors in place and the result trains
(`.train()`/`.eval()`) like any module. The batch dimension is exported dynamic, so the compact program
takes any batch size. Nodes get `tensor_meta` at the example input's shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import operator

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from vitcc.devices import failure_as_line
from vitcc.errors import VitccError, first_line
from vitcc.metrics import macs_counter
from vitcc.frontend.input_shapes import recorded_meta as source_meta

__all__ = ["ShapeRecording", "capture", "export_program", "propagate_shapes", "source_meta", "unlift"]


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's fast path is one opaque kernel: capture the composite ops instead."""
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(before)


def batch_dim(x: Any) -> int | None:
    """The batch axis of an example input: the first of size 1 (vitcc's examples have batch 1; a
    sequence-first (L, 1, E) input has it second), else the first axis."""
    if not isinstance(x, torch.Tensor) or not x.dim():
        return None
    return next((d for d, n in enumerate(x.shape) if n == 1), 0)


def _batched(example_inputs: tuple) -> tuple:
    """A batch of 2 lets torch.export keep the batch symbolic (a size-1 dimension would be specialised)."""
    out = []
    for x in example_inputs:
        d = batch_dim(x)
        if d is not None and x.shape[d] == 1:
            x = x.expand(*x.shape[:d], 2, *x.shape[d + 1:]).clone()
        out.append(x)
    return tuple(out)


def _register_output_dataclasses(model: torch.nn.Module, example_inputs: tuple) -> bool:
    """torch.export flattens outputs with pytree: a plain dataclass the model returns must be registered
    (HF's ModelOutput classes register themselves). Runs the model once; whether it registered a class."""
    with torch.no_grad():
        out = model(*example_inputs)
    todo, registered = [out], False
    while todo:
        v = todo.pop()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            if type(v) not in pytree.SUPPORTED_NODES:
                torch.export.register_dataclass(type(v))
                registered = True
            todo += [getattr(v, f.name) for f in dataclasses.fields(v)]
        elif isinstance(v, (list, tuple)):
            todo += list(v)
        elif isinstance(v, dict):
            todo += list(v.values())
    return registered


@contextlib.contextmanager
def _no_stack_traces():
    """torch.export records a Python stack trace per node (a third of its time on a ViT); no pass reads them.
    The switch is torch.fx.config's, which not every torch has (2.11 lacks it): there traces are recorded."""
    config = getattr(torch.fx, "config", None)
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def export_program(model: torch.nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True):
    """torch.export.export with a dynamic batch dimension on every tensor input (falling back to static).

    An output dataclass pytree does not know fails the export; it is registered (one forward) and the
    export retried, so models that return tensors or registered classes are not run just to look."""
    args = _batched(example_inputs) if dynamic_batch else tuple(example_inputs)
    errors = []
    looked = False
    for dynamic in ((True, False) if dynamic_batch else (False,)):
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        shapes = tuple({batch_dim(x): batch} if batch_dim(x) is not None else None
                       for x in example_inputs) if dynamic else None
        while True:
            try:
                with _no_mha_fastpath(), _no_stack_traces(), torch.enable_grad():
                    return torch.export.export(model, args if dynamic else tuple(example_inputs),
                                               dynamic_shapes=shapes, strict=False), dynamic
            except Exception as e:  # torch.export explains itself at length: keep its first line
                if not looked:
                    looked = True
                    try:
                        if _register_output_dataclasses(model, example_inputs):
                            continue
                    except Exception:  # the model does not run: torch.export's error says why
                        pass
                errors.append(e)
                break
    e = errors[-1]
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise VitccError(f"torch.export cannot capture {type(model).__name__}: {type(e).__name__}: {first[:300]}; "
                     "make forward free of data-dependent Python control flow on tensor values "
                     "(see https://pytorch.org/docs/stable/export.html), or pass a model that exports") from None


def capture(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Export `model`, unlift it into a plain GraphModule, and record shapes at `example_inputs`."""
    meta = source_meta(model)
    src = meta.get("source_class") or type(model).__name__
    model = model.eval()
    ep, dynamic = export_program(model, tuple(example_inputs))
    gm = unlift(ep)
    cfg = getattr(model, "pretrained_cfg", None) or meta.get("pretrained_cfg")
    meta.update(source_class=src, input_shape=tuple(example_inputs[0].shape) if example_inputs else None,
                dynamic_batch=dynamic)
    if isinstance(cfg, dict):
        meta["pretrained_cfg"] = {k: v for k, v in cfg.items() if _jsonable(v)}
    gm.meta.update(meta)
    gm.vitcc_meta = meta  # GraphModule pickling drops .meta but keeps plain attributes
    if not shapes_from_export(gm, example_inputs):
        propagate_shapes(gm, example_inputs, src)
    return gm


def shapes_from_export(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Each node's tensor_meta from torch.export's own records (`val`), with the symbolic batch evaluated at
    the example inputs: the shapes and dtypes a run records, without running the model (a forward of a
    ViT-B). False, and nothing recorded, where a record is missing or a size depends on data."""
    from torch.fx.passes.shape_prop import TensorMetadata
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(example_inputs):
        return False
    sizes: dict = {}  # input size symbol -> its size in the example inputs
    for n, x in zip(inputs, example_inputs):
        v = n.meta.get("val")
        if isinstance(x, torch.Tensor) != isinstance(v, torch.Tensor) or (
                isinstance(x, torch.Tensor) and v.dim() != x.dim()):
            return False
        for s, size in zip(v.shape if isinstance(v, torch.Tensor) else (), getattr(x, "shape", ())):
            if isinstance(s, torch.SymInt):
                if not s.node.expr.is_Symbol:
                    return False
                sizes[s.node.expr] = int(size)

    def concrete(s) -> int:
        if isinstance(s, torch.SymInt):
            s = s.node.expr
            s = s.xreplace(sizes) if hasattr(s, "xreplace") else s
            if not (isinstance(s, int) or s.is_Integer):
                raise _DataDependent
        return int(s)

    def meta(v, requires_grad: bool):
        if not isinstance(v, torch.Tensor):
            return v
        shape, stride = tuple(concrete(s) for s in v.shape), tuple(concrete(s) for s in v.stride())
        t = torch.empty_strided(shape, stride, dtype=v.dtype, device="meta")
        return TensorMetadata(*_extract_tensor_metadata(t)[:2], requires_grad, *_extract_tensor_metadata(t)[3:])

    records = {}
    try:
        for n in gm.graph.nodes:
            if n.op == "output":  # what it returns, as a run records it
                records[n] = map_aggregate(n.args[0], lambda a: records[a] if isinstance(a, fx.Node) else a)
                continue
            if "val" not in n.meta:
                return False
            grad = bool(getattr(operator.attrgetter(n.target)(gm), "requires_grad", False)) if n.op == "get_attr" else False
            records[n] = map_aggregate(n.meta["val"], lambda v: meta(v, grad))
    except _DataDependent:
        return False
    for n, tm in records.items():
        if not isinstance(tm, torch.SymInt) and (isinstance(tm, TensorMetadata) or isinstance(tm, (list, tuple))
                                                 and any(isinstance(m, TensorMetadata) for m in tm)):
            n.meta["tensor_meta"] = tm
    return True


class _DataDependent(Exception):
    """A recorded size that the example inputs' sizes do not determine."""


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a plain GraphModule: tensors as attributes, so it slices, trains and saves."""
    unlifted = ep.module()
    graph = unlifted.graph
    graph._tracer_cls = None  # export's tracer cannot be rebuilt on copy or pickle
    for n in list(graph.nodes):
        if n.op == "call_module" and not n.users:  # the input guard torch.export inserts
            graph.erase_node(n)
    # values nothing reads (MHA's averaged attention weights when the caller drops them) would otherwise
    # freeze what they touch; side-effecting ops stay
    graph.eliminate_dead_code()
    graph.lint()
    gm = fx.GraphModule(unlifted, graph)  # generates the code once, for the cleaned graph
    gm.delete_all_unused_submodules()
    return gm.eval()


class ShapeRecording:
    """fx.Interpreter mixin: records each node's tensor_meta (and type) as it runs, as torch's ShapeProp
    does, while `recording` is set; so a run made for another reason (verify's) can record them too."""
    recording = True

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.recording:
            found = False

            def meta(v):
                nonlocal found
                if isinstance(v, torch.Tensor):
                    found = True
                    return _extract_tensor_metadata(v)
                return v
            tm = map_aggregate(out, meta)
            if found:
                n.meta["tensor_meta"] = tm
            n.meta["type"] = type(out)
        return out


class _ShapeProp(ShapeRecording, fx.Interpreter):
    pass


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, src: str = "the model") -> int:
    """Record each node's tensor_meta at `example_inputs` by running the graph once, and count that run's
    MACs with torch.utils.flop_counter (`vitcc.metrics`) on the way: `gm.meta["macs"]`, also returned.
    Shapes and MACs are one analysis of the graph, valid or stale together, and cost one forward."""
    counter = macs_counter()
    shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
    gm.meta.pop("macs", None)  # stale until the run below succeeds
    with failure_as_line(lambda e: f"cannot run {src} on inputs of shape {shapes}: {first_line(e)}"):
        with torch.no_grad(), counter:
            _ShapeProp(gm).run(*example_inputs)
    gm.meta["macs"] = macs = counter.get_total_flops() // 2
    return macs


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
