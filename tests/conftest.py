"""Tiny model configs shared by the tests: depth 2, width 32-96, so the suite stays fast on 2 cores."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager, nullcontext

import timm
import torch
import pytest


def tiny_vit(embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, class_token=True, qkv_bias=True,
             init_values=None, fused=True, reg_tokens=0, num_classes=10, img_size=32, patch_size=8, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_token=class_token, qkv_bias=qkv_bias,
        init_values=init_values, reg_tokens=reg_tokens, num_classes=num_classes,
        global_pool="token" if class_token else "avg").eval()
    set_fused(m, fused)
    return m


def set_fused(model, fused: bool):
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return model


def image(batch=2, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """Two OpenMP threads on 2 shared, busy cores spin-wait: a tiny step takes 0.5 s instead of 0.03 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def vit():
    return tiny_vit()


def tiny_swin(v2=False, fused=True, seed=0, **kw):
    torch.manual_seed(seed)
    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    cfg = dict(img_size=64 if v2 else 56, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
               window_size=8 if v2 else 7, num_classes=10)
    cfg.update(kw)
    return set_fused(timm.create_model(name, pretrained=False, **cfg).eval(), fused)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in (root ignores permissions, but not /sys's refusal)."""
    import os
    from pathlib import Path
    folder = Path("/sys") if os.geteuid() == 0 else tmp_path / "read-only"
    if folder != Path("/sys"):
        folder.mkdir()
        folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        pytest.skip(f"{folder} is writable here")
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o700)


# ---------------------------------------------------------------- a hand-written ViT (no timm, no transformers)
QKV_FORMS = ("fused", "separate", "mha")  # one qkv Linear, three Linears, or nn.MultiheadAttention
ATTENTIONS = ("sdpa", "softmax", "einsum")  # F.scaled_dot_product_attention, q @ k^T softmax, torch.einsum
PATCHES = ("conv", "unfold", "tensor_unfold", "reshape")  # Conv2d, F.unfold, x.unfold, reshape-permute


class HandAttention(torch.nn.Module):
    def __init__(self, dim, heads, qkv="fused", attention="sdpa"):
        super().__init__()
        self.heads, self.qkv_form, self.attention = heads, qkv, attention
        if qkv == "mha":
            self.mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
            return
        if qkv == "fused":
            self.qkv = torch.nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        if self.qkv_form == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, n, c = x.shape
        if self.qkv_form == "fused":
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        scale = q.shape[-1] ** -0.5
        if self.attention == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        elif self.attention == "einsum":
            out = torch.einsum("bhnm,bhmd->bhnd", (torch.einsum("bhnd,bhmd->bhnm", q, k) * scale).softmax(-1), v)
        else:
            out = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class HandBlock(torch.nn.Module):
    def __init__(self, dim, heads, hidden, **attn):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads, **attn)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandPatchEmbed(torch.nn.Module):
    """Says its input size the way timm does (img_size, proj.in_channels), so vitcc needs no --input-shape.
    `patches`: a strided Conv2d, or cutting patches by hand (F.unfold, Tensor.unfold, reshape-permute) and a Linear."""

    def __init__(self, img_size, patch, in_chans, dim, patches="conv"):
        super().__init__()
        self.img_size, self.patch, self.patches = (img_size, img_size), patch, patches
        if patches == "conv":
            self.proj = torch.nn.Conv2d(in_chans, dim, patch, stride=patch)
        else:
            self.proj = torch.nn.Linear(in_chans * patch * patch, dim)

    def forward(self, x):
        p, (b, c, h, w) = self.patch, x.shape
        if self.patches == "conv":
            return self.proj(x).flatten(2).transpose(1, 2)
        if self.patches == "unfold":
            cols = torch.nn.functional.unfold(x, p, stride=p).transpose(1, 2)
        elif self.patches == "tensor_unfold":
            cols = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        else:
            cols = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return self.proj(cols)


class HandViT(torch.nn.Module):
    """A plain ViT written by hand: q/k/v fused, separate or nn.MultiheadAttention (`qkv`); attention by SDPA,
    explicit softmax or einsum (`attention`); class token or mean pooling; patches by conv or by hand (`patches`)."""

    def __init__(self, dim=48, depth=2, heads=3, hidden=96, img_size=32, patch=8, in_chans=3, num_classes=10,
                 qkv="fused", attention="sdpa", cls_token=True, patches="conv"):
        super().__init__()
        self.patch_embed = HandPatchEmbed(img_size, patch, in_chans, dim, patches)
        tokens = (img_size // patch) ** 2 + cls_token
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.pos_embed = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = torch.nn.Sequential(*(HandBlock(dim, heads, hidden, qkv=qkv, attention=attention)
                                            for _ in range(depth)))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


def hand_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return HandViT(**kw).eval()


# ---------------------------------------------------------------- Hugging Face transformers, from tiny configs
HF_KINDS = ("vit", "deit", "deit_distilled", "dinov2", "beit", "swin", "swinv2")
_HF_PLAIN = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                 patch_size=8, num_labels=10)
_HF_WINDOWED = dict(image_size=32, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4,
                    num_labels=10)
_HF = {  # kind: (config class, model class, config kwargs)
    "vit": ("ViTConfig", "ViTForImageClassification", _HF_PLAIN),
    "deit": ("DeiTConfig", "DeiTForImageClassification", _HF_PLAIN),
    "deit_distilled": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", _HF_PLAIN),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", dict(_HF_PLAIN, mlp_ratio=2)),
    "beit": ("BeitConfig", "BeitForImageClassification", dict(_HF_PLAIN, use_relative_position_bias=True)),
    "swin": ("SwinConfig", "SwinForImageClassification", _HF_WINDOWED),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification", _HF_WINDOWED),
}


def hf_config(kind):
    """A tiny transformers config for `kind` (one of HF_KINDS): 2 layers, width 24-48, 32x32 images."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, kw = _HF[kind]
    config = getattr(transformers, config_cls)(**kw)
    config.architectures = [model_cls]
    return config


def tiny_hf(kind, seed=0):
    """A tiny transformers model of `kind` with random weights, in eval mode."""
    transformers = pytest.importorskip("transformers")
    config = hf_config(kind)
    torch.manual_seed(seed)
    return getattr(transformers, config.architectures[0])(config).eval()


@pytest.fixture(scope="session")
def hf_vit_dir(tmp_path_factory):
    """hf_vit_dir(kind) -> a save_pretrained folder (config.json + model.safetensors) of tiny_hf(kind), made once."""
    made = {}

    def make(kind):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(f"hf_{kind}")
            tiny_hf(kind).save_pretrained(made[kind])
        return made[kind]
    return make


@pytest.fixture(scope="session")
def compact_deit(tmp_path_factory):
    """(model, CompileResult, .pt2 path): the distilled HF DeiT (two heads, its own output class) compiled once at
    S = 0.3 and saved with vitcc.save."""
    import vitcc
    model = tiny_hf("deit_distilled")
    result = vitcc.compile(model, sparsity=0.3, example_inputs=(image(1),))
    path = tmp_path_factory.mktemp("compact_deit") / "small.pt2"
    vitcc.save(result.module, path)
    return model, result, path


def one_training_step(module, x, y, logits=lambda out: out, lr=0.05):
    """One SGD step on `module` in train mode: every parameter gets a finite, non-zero gradient and the loss on
    the batch goes down; returns (loss before, loss after)."""
    module.train()
    assert all(m.training for m in module.modules())
    params = list(module.parameters())
    assert params and all(p.requires_grad for p in params)
    loss = torch.nn.functional.cross_entropy(logits(module(x)), y)
    loss.backward()
    bad = [n for n, p in module.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad, bad
    torch.optim.SGD(params, lr=lr).step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(logits(module(x)), y)
    assert after < loss
    module.eval()
    assert not module.training
    return loss.item(), after.item()


def same_params(a, b):
    """Same state-dict keys and identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def randomized(model):
    """Weights moved off their init, so a load that silently keeps the init is caught."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def analyzed(model=None, x=None, **options):
    """`model` (default: a tiny ViT) captured on `x` (default: `image()`) and analyzed: the Program."""
    from vitcc.frontend.capture import capture
    from vitcc.ir.program import Program
    from vitcc.pipeline.manager import make_pass
    model = model or tiny_vit()
    x = x if x is not None else image()
    p = Program(gm=capture(model, (x,)), example_inputs=(x,), options=options)
    make_pass("analyze").run(p)
    return p


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits at 32x32: a fifth of the training split (fast), the full validation split."""
    from torch.utils.data import DataLoader, Subset
    from vitcc.training.data import make_loaders
    train, val = make_loaders("digits", (3, 32, 32), batch_size=64, seed=0)
    small = DataLoader(Subset(train.dataset, range(0, len(train.dataset), 5)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return small, val


@contextmanager
def no_warnings():
    """Python warnings raise, and a logged warning fails on the way out: torch logs some instead of warning
    (torch.export.load's "must be a file ending in .pt2"), on its own loggers, which do not reach the root."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger) and not lg.propagate]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not records, [f"{r.name}: {r.getMessage()}" for r in records]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test its own latency cache: no test reads a table another measured, or writes under ~/.cache."""
    monkeypatch.setenv("VITCC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_file(tmp_path):
    """A tiny ViT saved with torch.save (test files with other needs define their own)."""
    path = tmp_path / "model.pt"
    torch.save(tiny_vit(), path)
    return path


@pytest.fixture
def declared_passes(monkeypatch):
    """Passes a test declares with @register_pass end with it: it declares them into a copy of the built-ins'."""
    import vitcc.passes  # noqa: F401  (the built-ins are declared first, whichever test runs first)
    from vitcc.pipeline import pass_base
    monkeypatch.setattr(pass_base, "_DECLARED", dict(pass_base._DECLARED))


@pytest.fixture
def cuda_events_on_the_host_clock(monkeypatch):
    """torch.cuda's timing events, synchronize and device context, on the host's clock: the arithmetic of the
    CUDA timing paths, which no CI machine runs, checked on work of known length (sleeps) before a GPU is lent."""
    import time

    class Event:
        def __init__(self, enable_timing: bool = False):
            self.at = None

        def record(self, stream=None):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end: "Event") -> float:
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())


# tests of float32 subnormals flushed to zero (vitcc.deploy.timing.flushed_subnormals) need a CPU that can
can_flush = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush subnormals")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests skip where there is no CUDA device (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def hand_made(program, heads_ms: float, other_ms: float) -> dict:
    """A table in which every unit costs `other_ms` per width slot at dense and heads cost `heads_ms` each."""
    from vitcc.search.latency_table import FORMAT, branch_slots, model_fingerprint, unit_signature
    units, branches = {}, {}
    for b in program.branches:
        s = unit_signature(program, b)
        branches[b.name] = s
        slots = {}
        for slot, g in branch_slots(program, b).items():
            grp = program.group(g)
            per = heads_ms if grp.kind == "heads" else other_ms
            slots[slot] = [[w, 1.0 + per * w / grp.size * 10] for w in range(1, grp.size + 1)]
        units[s] = {"role": b.role, "dense_ms": 1.0, "slots": slots}
    fp = model_fingerprint(program.gm, program.example_inputs)
    return {"format": FORMAT, "measured": {"model": "hand-made", **fp}, "units": units, "branches": branches,
            "dense_ms": len(program.branches) + 0.1, "rest_ms": 0.1, "rest": {}}
