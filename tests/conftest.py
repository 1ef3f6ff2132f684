"""Tiny model configs shared by the tests: depth 2, width 32-96, so the suite stays fast on 2 cores."""
from __future__ import annotations

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
