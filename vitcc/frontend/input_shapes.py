"""The example input's shape: what a model says about itself (its recorded meta, an HF config, timm's
patch embedding or pretrained cfg, torchvision's image size), or the user's override, bounded and checked
before anything is allocated. Below sources, capture and safe_pickle, which all read it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from vitcc.devices import device_of
from vitcc.errors import VitccError

__all__ = ["MAX_INPUT_ELEMENTS", "input_channels", "input_shape_for", "recorded_meta", "stored_input_shape"]


def recorded_meta(model) -> dict:
    """What an earlier trace recorded about the source model (also after a save/load round trip)."""
    meta = dict(getattr(model, "vitcc_meta", None) or {})
    return {**meta, **getattr(model, "meta", {})} if isinstance(model, fx.GraphModule) else meta


def _parse_shape(override) -> tuple[int, ...]:
    try:
        parts = override.replace("x", ",").split(",") if isinstance(override, str) else override
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise VitccError(f"bad input shape {override!r}: expected positive integers like 1,3,224,224")
    return shape


def _pair(size) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return tuple(size)
    return None


def _hf_shape(model) -> tuple[int, ...] | None:
    config = getattr(model, "config", None)
    img = _pair(getattr(config, "image_size", None)) if config is not None and not isinstance(config, dict) else None
    return (1, getattr(config, "num_channels", 3), *img) if img else None


def _timm_shape(model) -> tuple[int, ...] | None:
    """patch_embed.img_size wins over the pretrained cfg: timm keeps the default cfg when created with img_size=
    (or in_chans=: the channel count is that of the convolution the image reaches)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    cfg = cfg or recorded_meta(model).get("pretrained_cfg")
    size = tuple(cfg["input_size"]) if isinstance(cfg, dict) and cfg.get("input_size") else None
    patch_embed = getattr(model, "patch_embed", None)
    img = _pair(getattr(patch_embed, "img_size", None)) or (size[1:] if size and len(size) == 3 else None)
    if img:  # the channels: what reads the image (a cfg keeps 3 when created with in_chans=)
        guess = size[0] if size else 3
        return (1, input_channels(model, (1, guess, *img)) or guess, *img)
    return (1, *size) if size else None


class _Reached(Exception):
    """Ends a probe run at the first convolution or linear layer the input reaches."""


def input_channels(model: torch.nn.Module, shape: tuple[int, ...]) -> int | None:
    """The channel count the model reads its input with: the `in_channels` of the first convolution or
    linear layer that a run on an input of `shape` reaches, where that is a convolution fed the input itself
    (or a tensor of its shape). A forward pre-hook stops the run there, before that layer computes, so the
    input's own channel count does not matter. Not `patch_embed.proj`: VOLO's stem convolutions come
    before it. None where that cannot be told: a linear layer first, an error before any, a captured graph
    (its modules are inlined; its recorded shape says)."""
    if isinstance(model, fx.GraphModule) or len(shape) < 3 or math.prod(shape) > MAX_INPUT_ELEMENTS:
        return None
    probe = torch.zeros(shape, device=device_of(model))  # on a GPU model's device: ops before its first layer run
    found: list[int | None] = []

    def reached(module: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        fed = isinstance(x, torch.Tensor) and (x is probe or tuple(x.shape) == tuple(shape))
        found.append(module.in_channels if fed and isinstance(getattr(module, "in_channels", None), int) else None)
        raise _Reached

    layers = [m for m in model.modules() if isinstance(getattr(m, "in_channels", None), int)
              or isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_pre_hook(reached) for m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    except _Reached:
        pass
    except Exception:  # the model refuses this input before any layer: the run check says why
        return None
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return found[0] if found else None


def _torchvision_shape(model) -> tuple[int, ...] | None:
    img = _pair(getattr(model, "image_size", None))
    return (1, 3, *img) if img else None


MAX_INPUT_ELEMENTS = 2 ** 28  # 1 GiB of float32: a larger example input is a typo, not a model input


def input_shape_for(model: torch.nn.Module, override: str | tuple | None = None) -> tuple[int, ...]:
    """Example-input shape: the override, else what the model says about itself (batch 1); bounded and
    checked against the model's patch embedding before anything is allocated."""
    return _checked_shape(model, stored_input_shape(model) if override is None else _parse_shape(override),
                          override)


def _checked_shape(model: torch.nn.Module, shape: tuple[int, ...], given) -> tuple[int, ...]:
    what = "--input-shape " + ",".join(map(str, shape)) if given is not None else f"input shape {shape}"
    if not shape or any(d <= 0 for d in shape):
        raise VitccError(f"bad {what}: expected positive integers like 1,3,224,224")
    n = math.prod(shape)
    if n > MAX_INPUT_ELEMENTS:
        raise VitccError(f"{what} has {n:,} elements, more than the {MAX_INPUT_ELEMENTS:,} vitcc accepts; "
                         "pass a smaller --input-shape, e.g. 1,3,224,224")
    if len(shape) == 4:
        chans = input_channels(model, shape)
    elif hasattr(model, "patch_embed"):  # a timm image model: what an image of its own size reaches
        chans = input_channels(model, _image_shape(model))
    else:
        return shape
    if chans is not None and (len(shape) != 4 or shape[1] != chans):
        hw = shape[2:] if len(shape) == 4 else _image_shape(model)[2:]
        raise VitccError(f"{what} does not fit {type(model).__name__}: it takes images (N, {chans}, H, W); "
                         f"pass e.g. --input-shape 1,{chans},{hw[0]},{hw[1]}")
    return shape


def _image_shape(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """An image shape the model says it takes (its timm cfg or patch embedding), else 1,3,224,224."""
    shape = _timm_shape(model)
    return shape if shape is not None and len(shape) == 4 else (1, 3, 224, 224)


def stored_input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """What the model says about its input (batch 1), unchecked."""
    shape = getattr(model, "vitcc_input_shape", None) or recorded_meta(model).get("input_shape")
    if shape:
        return tuple(int(d) for d in shape)
    for said in (_hf_shape, _timm_shape, _torchvision_shape):
        shape = said(model)
        if shape:
            return shape
    raise VitccError(f"cannot tell the input shape of {type(model).__name__}; pass --input-shape, e.g. 1,3,224,224")
