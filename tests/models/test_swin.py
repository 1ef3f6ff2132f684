"""Swin and Swin-V2: windows, shifted windows, relative position tables, patch merging, all from per-op rules."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitcc
from vitcc.analysis.coupling import analyze
from vitcc.frontend.capture import capture
from vitcc.analysis.groups import build_groups

from conftest import image, tiny_swin


def groups_of(model, size):
    x = image(1, size)
    return {g.name: g for g in build_groups(analyze(capture(model, (x,))))}


def members(g):
    return {(m.param, m.axis) for m in g.members}


def test_swin_groups_heads_tables_and_patch_merging():
    groups = groups_of(tiny_swin(), 56)
    assert not [g for g in groups.values() if g.frozen]
    heads = groups["layers.0.blocks.1.attn.heads"]
    assert heads.size == 2 and ("layers.0.blocks.1.attn.relative_position_bias_table", 1) in members(heads)
    stage0, stage1 = groups["residual.0"], groups["residual.1"]
    # pruning channel c of stage 0 removes its four positions in the merge norm and the reduction's input
    assert {("layers.1.downsample.norm.weight", 0), ("layers.1.downsample.reduction.weight", 1)} <= members(stage0)
    assert ("layers.1.downsample.reduction.weight", 0) in members(stage1) and stage1.size == 48
    assert ("head.fc.weight", 1) in members(stage1)
    kinds = sorted({g.kind for g in groups.values()})
    assert kinds == ["head_dim", "heads", "mlp", "residual"]


def test_swinv2_logit_scale_and_cpb_mlp_are_sized_by_heads():
    groups = groups_of(tiny_swin(v2=True), 64)
    heads = groups["layers.1.blocks.0.attn.heads"]
    assert {("layers.1.blocks.0.attn.logit_scale", 0), ("layers.1.blocks.0.attn.cpb_mlp.2.weight", 0),
            ("layers.1.blocks.0.attn.q_bias", 0), ("layers.1.blocks.0.attn.v_bias", 0)} <= members(heads)
    assert not [g for g in groups.values() if g.frozen]


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swinv2"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_swin_every_kind_prunes_with_verified_equivalence(v2, fused):
    model = tiny_swin(v2=v2, fused=fused)
    size = 64 if v2 else 56
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(image(1, size),))
    assert r.report["max_rel_error"] < 1e-4
    for kind in ("residual", "heads", "head_dim", "mlp"):
        w = r.report["widths"][kind]
        assert w["after"] < w["before"], kind
    assert r.module(image(3, size)).shape == (3, 10)  # batch stays dynamic


def test_swin_planted_zeros_give_back_the_original():
    model = tiny_swin()
    C, D = 48, 12  # stage 1: 4 heads of 12; stage 0: 2 heads of 12, width 24
    with torch.no_grad():
        qkv = model.layers[1].blocks[0].attn.qkv
        for part in range(3):  # head 2 of layers.1.blocks.0: its q, k and v rows
            qkv.weight[part * C + 2 * D: part * C + 3 * D] = 0
            qkv.bias[part * C + 2 * D: part * C + 3 * D] = 0
        qkv = model.layers[0].blocks[1].attn.qkv
        rows = [2 * 24 + h * D + d for h in range(2) for d in (1, 5)]  # v dims 1 and 5 of every head
        rows += [part * 24 + h * D + d for part in (0, 1) for h in range(2) for d in (10, 11)]  # q/k dims 10, 11
        qkv.weight[rows] = 0
        qkv.bias[rows] = 0
        fc1 = model.layers[1].blocks[1].mlp.fc1
        fc1.weight[[0, 7, 33]] = 0
        fc1.bias[[0, 7, 33]] = 0
    x = image(2, 56)
    want = model(x)
    keep = {"layers.1.blocks.0.attn.heads": [0, 1, 3],
            "layers.0.blocks.1.attn.v_dim": [d for d in range(D) if d not in (1, 5)],
            "layers.0.blocks.1.attn.qk_dim": list(range(10)),
            "layers.1.blocks.1.mlp.hidden": [j for j in range(192) if j not in (0, 7, 33)]}
    r = vitcc.compile(model, "magnitude", keep=keep, example_inputs=(x,))
    torch.testing.assert_close(r.module(x), want, rtol=1e-5, atol=1e-5)
    assert r.module.get_submodule("layers.1.blocks.0.attn.qkv").weight.shape[0] == 3 * 3 * 12
    assert r.module.get_submodule("layers.0.blocks.1.attn.qkv").weight.shape[0] == 3 * 2 * 10


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 50), sparsity=st.floats(0.0, 0.8), v2=st.booleans(),
       kinds=st.lists(st.sampled_from(["residual", "heads", "head_dim", "mlp"]), min_size=1, unique=True))
def test_swin_random_selections_verify(seed, sparsity, v2, kinds):
    model = tiny_swin(v2=v2, seed=seed)
    r = vitcc.compile(model, f"random{{seed={seed}}}", sparsity=sparsity, prune=kinds,
                      example_inputs=(image(1, 64 if v2 else 56),))
    assert r.report["max_rel_error"] < 1e-4


def test_swinv2_planted_zeros_give_back_the_original():
    model = tiny_swin(v2=True)
    C, D = 48, 12  # stage 1: 4 heads of 12
    attn = model.layers[1].blocks[1].attn
    with torch.no_grad():
        for part in range(3):  # head 1: q, k and v rows, and the q and v biases
            attn.qkv.weight[part * C + D: part * C + 2 * D] = 0
        attn.q_bias[D:2 * D] = 0
        attn.v_bias[D:2 * D] = 0
        fc1 = model.layers[0].blocks[0].mlp.fc1
        fc1.weight[[3, 4, 50]] = 0
        fc1.bias[[3, 4, 50]] = 0
    x = image(2, 64)
    want = model(x)
    keep = {"layers.1.blocks.1.attn.heads": [0, 2, 3],
            "layers.0.blocks.0.mlp.hidden": [j for j in range(96) if j not in (3, 4, 50)]}
    r = vitcc.compile(model, "magnitude", keep=keep, example_inputs=(x,))
    torch.testing.assert_close(r.module(x), want, rtol=1e-5, atol=1e-5)
    assert r.module.get_submodule("layers.1.blocks.1.attn.qkv").weight.shape[0] == 3 * 3 * 12
