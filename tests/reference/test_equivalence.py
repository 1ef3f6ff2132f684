"""Hypothesis over random ViT configurations and random selections: compact == masked every time."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitcc

from conftest import image, tiny_vit

KINDS = ["residual", "heads", "head_dim", "mlp"]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 2),
       mlp_ratio=st.sampled_from([1.0, 2.0, 4.0]), class_token=st.booleans(), qkv_bias=st.booleans(),
       layer_scale=st.booleans(), fused=st.booleans(), sparsity=st.floats(0.0, 0.9),
       kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True), seed=st.integers(0, 99),
       method=st.sampled_from(["random", "magnitude", "magnitude{p=1}", "lamp"]))
def test_random_configs_and_selections_verify(heads, head_dim, depth, mlp_ratio, class_token, qkv_bias,
                                              layer_scale, fused, sparsity, kinds, seed, method):
    model = tiny_vit(embed_dim=heads * head_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                     class_token=class_token, qkv_bias=qkv_bias, init_values=0.5 if layer_scale else None,
                     fused=fused, seed=seed)
    method = f"random{{seed={seed}}}" if method == "random" else method
    r = vitcc.compile(model, method, sparsity=sparsity, prune=kinds, example_inputs=(image(),))
    assert r.report["max_rel_error"] < 1e-4
    assert r.report["params_after"] <= r.report["params_before"]
    for g in r.groups:
        kept = r.selection.get(g.name)
        if kept is not None and g.kind in kinds and g.prunable:
            assert 1 <= len(kept) <= g.size


def test_nothing_removed_is_the_original_model():
    import torch
    model = tiny_vit()
    x = image()
    r = vitcc.compile(model, "magnitude", sparsity=0.0, example_inputs=(x,))
    torch.testing.assert_close(r.module(x), model(x), rtol=0, atol=0)
    assert r.report["params_after"] == r.report["params_before"]
