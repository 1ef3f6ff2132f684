"""Real timm architectures (random weights), shrunk in image size only so the suite stays fast."""
import pytest
import timm
import torch

import vitcc

from conftest import set_fused

CASES = [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}),   # distillation token, two heads
    ("deit3_small_patch16_224", {"img_size": 64}),           # layer scale
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "num_classes": 10}),  # register tokens
    ("vit_medium_patch16_gap_256", {"img_size": 64}),        # no class token, average pooling
]


@pytest.mark.parametrize("name, kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_timm_model_compiles_with_verified_equivalence(name, kw, fused):
    model = set_fused(timm.create_model(name, pretrained=False, **kw).eval(), fused)
    size = kw.get("img_size", 224)
    x = torch.randn(1, 3, size, size)
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(x,))
    assert r.report["max_rel_error"] < 1e-4
    assert not r.report["frozen"], r.report["frozen"]
    widths = r.report["widths"]
    assert set(widths) >= {"residual", "heads", "head_dim", "mlp"}
    for kind in ("residual", "head_dim", "mlp"):
        assert widths[kind]["after"] <= 0.5 * widths[kind]["before"] + widths[kind]["groups"]
    assert r.report["params_after"] < 0.4 * r.report["params_before"]
