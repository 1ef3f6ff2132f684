"""Model frontend: load a model from a spec or file (vitcc.sources, safely), pick its input shape, trace it."""
from __future__ import annotations

import inspect, json

import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch.fx.passes.shape_prop import ShapeProp

from vitcc import sources
from vitcc.errors import VitccError

__all__ = ["load_model", "input_shape_for", "trace", "register_leaf_module", "register_leaf_function"]

_leaf_modules: set[type] = set()
_leaf_functions: set = set()


def register_leaf_module(cls: type) -> type:
    """Keep instances of `cls` opaque when tracing (e.g. data-dependent control flow). Usable as a decorator."""
    _leaf_modules.add(cls)
    return cls


def register_leaf_function(fn):
    """Record calls to `fn` as one graph node instead of tracing into it."""
    _leaf_functions.add(fn)
    return fn


# ---------------------------------------------------------------- loading: vitcc.sources says where a model comes from
load_model, input_shape_for, stored_input_shape = sources.load_model, sources.input_shape_for, sources.stored_input_shape
MAX_INPUT_ELEMENTS = sources.MAX_INPUT_ELEMENTS
_vitcc_meta = sources.recorded_meta


# ---------------------------------------------------------------- tracing
class VitccTracer(fx.Tracer):
    """fx tracer with timm's and the user's leaf modules / functions; remembers which module it failed in."""

    def __init__(self):
        fns = {f for f in timm_fx.get_notrace_functions() if callable(f)} | _leaf_functions
        super().__init__(autowrap_functions=tuple(fns))
        self.failed_in = None

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return (super().is_leaf_module(m, qualname) or timm_fx.is_notrace_module(type(m))
                or isinstance(m, tuple(_leaf_modules)))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or (self.path_of_module(m), type(m).__name__)
            raise


_vitcc_meta = sources.recorded_meta


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Trace `model` with its first len(example_inputs) forward parameters as inputs; nodes get tensor_meta."""
    meta = _vitcc_meta(model)
    src = meta.get("source_class") or type(model).__name__
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[len(example_inputs):]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise VitccError(f"{src}.forward needs argument {p.name!r}; give one example input per required argument")
        concrete[p.name] = p.default
    tracer = VitccTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        where = f"in module {tracer.failed_in[0]!r}" if tracer.failed_in else "in the top-level forward"
        leaf = tracer.failed_in[1] if tracer.failed_in else "<ClassName>"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitccError(f"cannot trace {src}: {first}, {where}; mark it as a leaf with vitcc.frontend."
                         f"register_leaf_module({leaf}) or timm.layers.register_notrace_module") from None
    _drop_placeholders(graph, len(example_inputs))
    gm = fx.GraphModule(model, graph)
    cfg = getattr(model, "pretrained_cfg", None) or meta.get("pretrained_cfg")
    meta.update(source_class=src, input_shape=tuple(example_inputs[0].shape) if example_inputs else None)
    if isinstance(cfg, dict):
        meta["pretrained_cfg"] = {k: v for k, v in cfg.items() if _jsonable(v)}
    gm.meta.update(meta)
    gm.vitcc_meta = meta  # GraphModule pickling drops .meta but keeps plain attributes
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise VitccError(f"cannot run {src} on inputs of shape {shapes}: {(str(e).splitlines() or [''])[0]}") from None
    return gm


def _drop_placeholders(graph: fx.Graph, keep: int) -> None:
    """concrete_args still leave placeholders (and asserts on them) behind: remove them when nothing else uses them."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][keep:]:
        doomed, todo = set(), [ph]
        while todo:
            n = todo.pop()
            doomed.add(n)
            todo += [u for u in n.users if u not in doomed]
        if not any(n.op == "output" for n in doomed):
            for n in reversed(list(graph.nodes)):
                if n in doomed:
                    graph.erase_node(n)
    graph.lint()
