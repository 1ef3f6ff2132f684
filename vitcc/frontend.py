"""Model frontend: load a model from a spec or file (safely) and pick its input shape."""
from __future__ import annotations

import difflib, math
from pathlib import Path

import torch
import torch.fx as fx

from vitcc import safe_pickle
from vitcc.errors import VitccError

__all__ = ["load_model", "input_shape_for", "trace"]





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


# ---------------------------------------------------------------- capture
def _vitcc_meta(model) -> dict:
    from .capture import source_meta
    return source_meta(model)


def trace(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Capture `model` with torch.export (see vitcc.capture)."""
    from .capture import capture
    return capture(model, example_inputs)
