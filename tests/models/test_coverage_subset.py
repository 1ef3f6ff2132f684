"""A fast subset of the coverage sweep (benchmarks/coverage.py): architectures of its list that compile
today, as tiny configs (few blocks, narrow, small images), each compiled at S = 0.3 with the default
pipeline. Every one must verify; `full` ones must freeze nothing; `partial` ones must still prune.
"""
import pytest
import timm
import torch

import vitcc

# name, reduced kwargs, image size, status in the sweep (benchmarks/results/coverage.md)
CASES = [
    # hierarchical, spatial-reduction attention (strided conv on k/v), depthwise-conv MLP
    ("pvt_v2_b0", dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4)), 64, "full"),
    # talking-heads attention, class-attention blocks, layer scale
    ("cait_xxs24_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, depth_token_only=1),
     32, "full"),
    # locally-grouped attention (a notrace module today: partial) + global sub-sampled attention, conv pos. encoding
    ("twins_svt_small", dict(img_size=64, embed_dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4)),
     64, "partial"),
    # cross-covariance attention (softmax over the head-dim axis: partial), local patch interaction, class attention
    ("xcit_tiny_12_p16_224", dict(img_size=64, embed_dim=48, depth=2, num_heads=3), 64, "partial"),
]


@pytest.mark.parametrize("name, kw, size, status", CASES, ids=[c[0] for c in CASES])
def test_coverage_subset_compiles_and_verifies(name, kw, size, status):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    r = vitcc.compile(model, "magnitude", sparsity=0.3, example_inputs=(x,))
    rep = r.report
    assert rep["max_rel_error"] < 1e-4
    with torch.no_grad():
        assert r.module(x).shape == model(x).shape
    frozen_groups = [g.name for g in r.groups if g.frozen is not None]
    if status == "full":
        assert not rep["frozen"], rep["frozen"]
        assert not frozen_groups, frozen_groups
    assert rep["params_after"] < rep["params_before"]
    assert rep["macs_after"] < rep["macs_before"]


def test_family_rule_finds_attention_by_class_name_or_softmax_in_forward():
    """benchmarks/coverage_models.py lists timm's families by this rule, on models built on the meta device."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from coverage_models import _attention_classes
    cache: dict = {}
    with torch.device("meta"):
        convit, resnet, deit = (timm.create_model(n, pretrained=False) for n in
                                ("convit_tiny", "resnet18", "deit_tiny_patch16_224"))
    assert "MHSA" in _attention_classes(convit, cache)  # single class named otherwise: softmax in its forward
    assert _attention_classes(deit, cache) == ["Attention"]
    assert _attention_classes(resnet, cache) == []
