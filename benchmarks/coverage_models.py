"""The models of the coverage sweep (benchmarks/coverage.py): one per timm architecture family with attention,
listed from timm itself, plus Hugging Face transformers, torchvision and nn.MultiheadAttention models.

A timm *family* is a module of `timm.models` (`timm.list_modules()`). A family is in the sweep when one of its
models contains attention, by this rule, checked on the model built on the meta device (no memory, no weights):

- it instantiates a module whose class name contains ``Attention`` or ``Attn``, or an ``nn.MultiheadAttention``;
- or a timm module whose own ``forward`` calls ``scaled_dot_product_attention`` or ``softmax`` (this catches
  single-head and convolutional attention named otherwise: convit's MHSA, shvit's SHSA, iformer's SHMA).

Its representative is the smallest such model by parameter count. Linear attention without a softmax and not
named attention (efficientvit_mit's LiteMLA) is not counted. Listing builds every timm model on the meta device
(about 3 minutes on 2 cores), so the list is cached in benchmarks/results/coverage_families.json per timm version.

Sources are strings: ``timm:NAME``, ``hf:KIND`` (tests/conftest.py's tiny configs), ``torchvision:NAME``
(weights=None) and ``nn:NAME`` (the small nn.MultiheadAttention / nn.TransformerEncoder ViTs below).
"""
from __future__ import annotations

import inspect
import json
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
FAMILIES_CACHE = REPO / "benchmarks/results/coverage_families.json"
_ATTN_NAME = re.compile(r"Attention|Attn")
_ATTN_SOURCE = re.compile(r"scaled_dot_product_attention|softmax")
FAMILY_RULE = ("a family is in when one of its models, built on the meta device, has a module whose class name "
               "contains `Attention` or `Attn`, or an `nn.MultiheadAttention`, or a timm module whose own `forward` "
               "calls `scaled_dot_product_attention` or `softmax`; its representative is the smallest such model by "
               "parameter count.")

# Full-size representatives too slow for 2 cores at their own size are built smaller (recorded per row).
# Reductions keep the architecture (every block type, attention kind and head layout); they cut depth/size.
REDUCE: dict[str, dict] = {  # name: create_model kwargs; "input" alone sets the example's image size
    "deepseek_vit_412m": dict(depth=4, img_size=224),
    "gemma4_vit_167m": dict(depth=4, img_size=224),
    "qwen3_vit_88m": dict(depth=4, img_size=224),
    "naflexvit_base_patch16_parfac_gap": dict(depth=4),
    "beit_base_patch16_224": dict(depth=4),
    "samvit_base_patch16_224": dict(depth=4),
    "sam2_hiera_tiny": dict(input=224),
}
EXTRA = ["hf:vit", "hf:deit", "hf:deit_distilled", "hf:dinov2", "hf:beit", "hf:swin", "hf:swinv2",
         "torchvision:vit_b_16", "torchvision:swin_t", "nn:mha_vit", "nn:encoder_vit"]


# ------------------------------------------------------------------------------------- timm families
def _attention_classes(model: nn.Module, cache: dict) -> list[str]:
    """Class names of the model's modules that count as attention (see the module docstring)."""
    out = set()
    for m in model.modules():
        cls = type(m)
        if cls not in cache:
            hit = bool(_ATTN_NAME.search(cls.__name__)) or isinstance(m, nn.MultiheadAttention)
            if not hit and cls.__module__.startswith("timm."):
                try:
                    hit = bool(_ATTN_SOURCE.search(inspect.getsource(cls.forward)))
                except (OSError, TypeError):
                    hit = False
            cache[cls] = hit
        if cache[cls]:
            out.add(cls.__name__)
    return sorted(out)


def discover_families() -> dict:
    """Every timm family with attention and its smallest attention model, built on the meta device."""
    import timm
    cache: dict = {}
    families = {}
    for module in timm.list_modules():
        best = None
        for name in timm.list_models(module=module):
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                try:
                    m = timm.create_model(name, pretrained=False)
                except Exception:  # noqa: BLE001 - a model timm cannot build is not a candidate
                    continue
            attn = _attention_classes(m, cache)
            n = sum(p.numel() for p in m.parameters())
            if attn and (best is None or n < best["params"]):
                best = {"model": name, "params": n, "attention": attn, "models_in_family": 0}
        if best is not None:
            best["models_in_family"] = len(timm.list_models(module=module))
            families[module] = best
    return {"timm": timm.__version__, "rule": FAMILY_RULE, "families": families}


def families(refresh: bool = False) -> dict:
    """The cached family list, rediscovered when asked or when timm's version changed."""
    import timm
    if not refresh and FAMILIES_CACHE.exists():
        data = json.loads(FAMILIES_CACHE.read_text())
        if data.get("timm") == timm.__version__:
            return data
    data = discover_families()
    FAMILIES_CACHE.parent.mkdir(parents=True, exist_ok=True)
    FAMILIES_CACHE.write_text(json.dumps(data, indent=1) + "\n")
    return data


def sweep_models(refresh: bool = False) -> list[str]:
    fams = families(refresh)["families"]
    return [f"timm:{fams[k]['model']}" for k in sorted(fams)] + EXTRA


def family_of(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind != "timm":
        return source
    fams = json.loads(FAMILIES_CACHE.read_text())["families"] if FAMILIES_CACHE.exists() else {}
    return next((k for k, v in fams.items() if v["model"] == name), "")


# ------------------------------------------------------------------------------------- nn.* models
class _Patches(nn.Module):
    def __init__(self, dim: int, patch: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class EncoderViT(nn.Module):
    """A ViT on nn.TransformerEncoder (batch_first, pre-norm, GELU): packed in_proj, nn.MultiheadAttention."""

    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 4, img: int = 64, num_classes: int = 10):
        super().__init__()
        self.patches = _Patches(dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // 8) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patches(x)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


class _MHABlock(nn.Module):
    """Sequence-first nn.MultiheadAttention with separate q/k/v weights (kdim/vdim given) and no bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=False, kdim=dim, vdim=dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class MHAViT(nn.Module):
    """A ViT whose blocks call nn.MultiheadAttention directly, sequence first, mean pooled."""

    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 4, img: int = 64, num_classes: int = 10):
        super().__init__()
        self.patches = _Patches(dim)
        self.pos = nn.Parameter(torch.randn((img // 8) ** 2, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_MHABlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patches(x).transpose(0, 1) + self.pos  # (L, B, E)
        for b in self.blocks:
            t = b(t)
        return self.head(t.mean(0))


_NN = {"mha_vit": MHAViT, "encoder_vit": EncoderViT}


# ------------------------------------------------------------------------------------- building
def _tiny_hf(kind: str) -> nn.Module:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_hf  # the suite's tiny configs: one definition of each HF model
    return tiny_hf(kind)


def build(source: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """(model in eval mode with seed-0 random weights, example input of batch 1, what was reduced)."""
    kind, _, name = source.partition(":")
    torch.manual_seed(0)
    reduced: dict = {}
    if kind == "timm":
        import timm
        reduced = dict(REDUCE.get(name, {}))
        kwargs = {k: v for k, v in reduced.items() if k != "input"}
        model = timm.create_model(name, pretrained=False, **kwargs)
        shape = model.pretrained_cfg["input_size"]
        size = reduced.get("input", kwargs.get("img_size"))
        if size:
            shape = (shape[0], size, size)
    elif kind == "hf":
        model = _tiny_hf(name)
        shape = (model.config.num_channels, model.config.image_size, model.config.image_size)
        reduced = {"config": "tests/conftest.py tiny_hf (2 layers, width 24-48, 32x32)"}
    elif kind == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        size = getattr(model, "image_size", 224)
        shape = (3, size, size)
    elif kind == "nn":
        model = _NN[name]()
        shape = (3, 64, 64)
        reduced = {"config": "dim 96, depth 4, heads 4, 64x64"}
    else:
        raise ValueError(f"unknown model source {source!r}: use timm:, hf:, torchvision: or nn:")
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    return model.eval(), x, reduced


def first_tensor(out) -> torch.Tensor:
    """The logits of whatever the model returned (a tensor, a tuple, an HF output class)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(f"no tensor in {type(out).__name__}")


def classifier(model: nn.Module) -> list[nn.Module]:
    """The classifier layers Torch-Pruning must leave alone: timm's get_classifier, else the last Linear."""
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        return [m for m in (clf if isinstance(clf, (tuple, list)) else (clf,)) if isinstance(m, nn.Module)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]
