"""torchvision's ViT (attention through nn.MultiheadAttention) and Swin, at reduced sizes: every kind prunes.

The full-size torchvision:vit_b_16 and torchvision:swin_t compile the same way (checked by hand: about 1.5
minutes each here, too slow for the suite)."""
import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import vitcc

from conftest import image


def small_vit():
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48, mlp_dim=96,
                             num_classes=10).eval()


def small_swin():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()


@pytest.mark.parametrize("make", [small_vit, small_swin], ids=["vit", "swin"])
def test_torchvision_models_prune_every_kind(make):
    model = make()
    r = vitcc.compile(model, sparsity=0.3, example_inputs=(image(1),))
    assert not r.report["frozen"]
    assert r.report["max_rel_error"] < 1e-4
    for kind in ("residual", "heads", "head_dim", "mlp"):
        w = r.report["widths"][kind]
        assert w["after"] < w["before"], (kind, r.report["widths"])
    x = image(3)
    with torch.no_grad():
        assert r.module(x).shape == model(x).shape == (3, 10)
    assert r.report["params_after"] < 0.7 * r.report["params_before"]
