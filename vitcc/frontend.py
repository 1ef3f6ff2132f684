"""Model frontend: load a model from a spec or file (safely), pick its input shape, trace it to torch.fx."""
from __future__ import annotations

import difflib, inspect, json, math
from pathlib import Path

import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch.fx.passes.shape_prop import ShapeProp

from vitcc import safe_pickle
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


# ---------------------------------------------------------------- loading
_FORMS = ("timm:NAME (e.g. timm:deit_tiny_patch16_224), a torch.save'd module (.pt/.pth), "
          "or a state dict (.pt/.pth/.safetensors) together with --arch timm:NAME")


def _timm_model(name: str) -> torch.nn.Module:
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise VitccError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                              "; see timm.list_models()"))
    return timm.create_model(name, pretrained=False)


def _cannot_read(path, e: Exception) -> VitccError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return VitccError(f"cannot read {path}: {reason}; "
                      "expected a torch.save'd module, a state dict (.pt) or a .safetensors file")


def _existing(path) -> Path:
    if not Path(path).is_file():
        raise VitccError(f"no such file: {path}")
    return Path(path)


def _read_state_dict(path) -> dict:
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = safe_pickle.load(path)  # torch's weights-only loader lets a file ask for bytearray(10**10)
    except Exception as e:
        raise _cannot_read(path, e) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        sd = sd[key] if isinstance(sd, dict) and isinstance(sd.get(key), dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitccError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def _load_state(model: torch.nn.Module, sd: dict, path, arch: str) -> None:
    own = model.state_dict()
    kinds = {"wrong shape": [f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                             for k, v in sd.items() if k in own and v.shape != own[k].shape],
             "unexpected": [f"unexpected {k}" for k in sd if k not in own],
             "missing": [f"missing {k}" for k in own if k not in sd]}
    if any(kinds.values()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in kinds.items() if v)
        examples = "; ".join([e for v in kinds.values() for e in v[:2]][:4])
        raise VitccError(f"{path} does not fit {arch} ({counts}): {examples}")
    model.load_state_dict(sd, strict=True)


def load_model(spec: str, *, weights: str | None = None, arch: str | None = None,
               trust_pickle: bool = False) -> torch.nn.Module:
    """Load `spec` (see _FORMS) in eval mode; never unpickles untrusted globals unless trust_pickle."""
    if spec.startswith("timm:"):
        if arch:
            raise VitccError("--arch only applies to a state-dict file; with a timm: spec use --weights FILE")
        model = _timm_model(spec[5:])
        if weights:
            _load_state(model, _read_state_dict(weights), weights, spec)
        return model.eval()
    path = Path(spec)
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise VitccError(f"unknown model spec {spec!r}: expected {_FORMS}")
    _existing(path)
    if path.suffix == ".safetensors" or arch:
        if weights:
            raise VitccError("--weights applies to a timm: spec or a model file; pass a state-dict file as the "
                             "model with --arch")
        if not arch or not arch.startswith("timm:"):
            raise VitccError(f"{spec} holds a state dict: pass --arch timm:NAME to say which model it belongs to")
        model = _timm_model(arch[5:])
        _load_state(model, _read_state_dict(path), path, arch)
        return model.eval()
    try:
        obj = safe_pickle.load(path, trust_pickle=trust_pickle)
    except VitccError:
        raise
    except Exception as e:
        raise _cannot_read(path, e) from None
    if isinstance(obj, fx.GraphModule):
        obj.meta.update(_vitcc_meta(obj))
    if isinstance(obj, torch.nn.Module):
        if weights:  # e.g. a fine-tuning checkpoint (a state dict) into the compiled model it belongs to
            _load_state(obj, _read_state_dict(weights), weights, spec)
        return obj.eval()
    if isinstance(obj, dict):
        raise VitccError(f"{spec} holds a state dict: pass --arch timm:NAME to say which model it belongs to")
    raise VitccError(f"{spec} holds a {type(obj).__name__}; expected {_FORMS}")


# ---------------------------------------------------------------- input shape
MAX_INPUT_ELEMENTS = 2 ** 28  # 1 GiB of float32: a larger example input is a typo, not a model input


def input_shape_for(model: torch.nn.Module, override: str | tuple | None = None) -> tuple[int, ...]:
    """Example-input shape: the override, else what the model says about itself (batch 1); bounded and
    checked against the model's patch embedding before anything is allocated."""
    return _checked_shape(model, stored_input_shape(model) if override is None else _parsed_shape(override),
                          override)


def _checked_shape(model: torch.nn.Module, shape: tuple[int, ...], given) -> tuple[int, ...]:
    what = "--input-shape " + ",".join(map(str, shape)) if given is not None else f"input shape {shape}"
    if not shape or any(d <= 0 for d in shape):
        raise VitccError(f"bad {what}: expected positive integers like 1,3,224,224")
    n = math.prod(shape)
    if n > MAX_INPUT_ELEMENTS:
        raise VitccError(f"{what} has {n:,} elements, more than the {MAX_INPUT_ELEMENTS:,} vitcc accepts; "
                         "pass a smaller --input-shape, e.g. 1,3,224,224")
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, torch.nn.Conv2d) and (len(shape) != 4 or shape[1] != proj.in_channels):
        img = getattr(pe, "img_size", None)
        hw = tuple(img) if isinstance(img, (tuple, list)) and len(img) == 2 else (224, 224)
        raise VitccError(f"{what} does not fit {type(model).__name__}: it takes images (N, {proj.in_channels}, H, "
                         f"W); pass e.g. --input-shape 1,{proj.in_channels},{hw[0]},{hw[1]}")
    return shape


def _parsed_shape(override: str | tuple) -> tuple[int, ...]:
    try:
        parts = override.replace("x", ",").split(",") if isinstance(override, str) else override
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise VitccError(f"bad input shape {override!r}: expected positive integers like 1,3,224,224")
    return shape


def stored_input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """What the model says about its input (batch 1), unchecked."""
    meta = _vitcc_meta(model)
    shape = getattr(model, "vitcc_input_shape", None) or meta.get("input_shape")
    if shape:
        return tuple(int(d) for d in shape)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or meta.get("pretrained_cfg")
    cfg = cfg if isinstance(cfg, dict) else {}
    if cfg.get("input_size"):
        size = tuple(cfg["input_size"])
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm keeps the default cfg when
        if isinstance(img, (tuple, list)) and len(img) == 2:                 # created with img_size=...
            size = (size[0], *img)
        return (1, *size)
    raise VitccError(f"cannot tell the input shape of {type(model).__name__}; pass --input-shape, e.g. 1,3,224,224")


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


def _vitcc_meta(model) -> dict:
    """What an earlier trace recorded about the source model (also after a save/load round trip)."""
    meta = dict(getattr(model, "vitcc_meta", None) or {})
    return {**meta, **getattr(model, "meta", {})} if isinstance(model, fx.GraphModule) else meta


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
