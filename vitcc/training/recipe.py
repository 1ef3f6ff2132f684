"""The fine-tuning recipe DeiT trains with, as timm's parts (not re-implemented here), and the precision.

`Recipe` holds what a practitioner sets: RandAugment and random erasing (the training transform,
`timm.data.create_transform`, built by `vitcc.training.data.make_loaders`), mixup/cutmix and label
smoothing (`timm.data.Mixup`, `timm.loss.SoftTargetCrossEntropy` / `LabelSmoothingCrossEntropy`), warmup
before the cosine schedule (`timm.scheduler.CosineLRScheduler`), a model EMA (`timm.utils.ModelEmaV3`)
and stochastic depth on the residual branches (`vitcc.training.surgery.drop_path_copy`, timm's DropPath).
The defaults are all off: `Recipe()` trains as vitcc always did.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vitcc.errors import VitccError

__all__ = ["Recipe", "PRECISIONS", "resolve_precision", "autocast_dtype"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    aa: str | None = None  # RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (timm's auto_augment string)
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    smoothing: float = 0.0  # label smoothing
    warmup_epochs: float = 0.0  # linear warmup before the cosine schedule
    ema: float | None = None  # EMA decay of the weights (None: no EMA)
    drop_path: float = 0.0  # stochastic depth of the last residual branch (0 at the first, linear between)

    def __post_init__(self) -> None:
        for name in ("reprob", "smoothing", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise VitccError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        for name in ("mixup", "cutmix", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise VitccError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise VitccError(f"--ema is the EMA decay, in (0, 1) (e.g. 0.9998), got {self.ema}")
        if self.aa is not None:
            from timm.data.auto_augment import rand_augment_transform
            if not self.aa.startswith("rand"):
                raise VitccError(f"--aa {self.aa!r}: give a RandAugment policy such as rand-m9-mstd0.5-inc1")
            try:
                rand_augment_transform(self.aa, {})
            except Exception as e:  # timm's parser raises AssertionError/ValueError with its own words
                raise VitccError(f"--aa {self.aa!r} is not a RandAugment policy timm reads ({str(e) or type(e).__name__}); "
                                 "e.g. rand-m9-mstd0.5-inc1") from None

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def augments(self) -> bool:
        """Whether the training images go through timm's training transform (RandAugment, random erasing)."""
        return self.aa is not None or self.reprob > 0

    def to_json(self) -> dict:
        return asdict(self)


def resolve_precision(spec: str | None, device: torch.device) -> str:
    """fp32, bf16 or fp16; None: bf16 on a GPU that supports it, fp32 elsewhere (CPU autocast is slower
    than fp32 on most CPUs)."""
    if spec is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    text = str(spec).strip().lower()
    if text not in PRECISIONS:
        raise VitccError(f"unknown --precision {spec!r}; use {', '.join(PRECISIONS)}")
    if text == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise VitccError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
    return text


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
