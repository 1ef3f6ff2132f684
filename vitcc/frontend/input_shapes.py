"""The example input's shape: what a model says about itself (its recorded meta, an HF config, timm's
patch embedding or pretrained cfg, torchvision's image size), or the user's override, bounded and checked
before anything is allocated. Below sources, capture and safe_pickle, which all read it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from vitcc.errors import VitccError

__all__ = ["MAX_INPUT_ELEMENTS", "input_shape_for", "recorded_meta", "stored_input_shape"]


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
    """patch_embed.img_size wins over the pretrained cfg: timm keeps the default cfg when created with img_size=."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    cfg = cfg or recorded_meta(model).get("pretrained_cfg")
    size = tuple(cfg["input_size"]) if isinstance(cfg, dict) and cfg.get("input_size") else None
    patch_embed = getattr(model, "patch_embed", None)
    img = _pair(getattr(patch_embed, "img_size", None))
    if img:
        chans = getattr(getattr(patch_embed, "proj", None), "in_channels", None) or (size[0] if size else 3)
        return (1, chans, *img)
    return (1, *size) if size else None


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
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, torch.nn.Conv2d) and (len(shape) != 4 or shape[1] != proj.in_channels):
        img = getattr(pe, "img_size", None)
        hw = tuple(img) if isinstance(img, (tuple, list)) and len(img) == 2 else (224, 224)
        raise VitccError(f"{what} does not fit {type(model).__name__}: it takes images (N, {proj.in_channels}, H, "
                         f"W); pass e.g. --input-shape 1,{proj.in_channels},{hw[0]},{hw[1]}")
    return shape


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
