import pytest
import torch
from torch import nn

from vitcc.frontend.capture import capture
from vitcc.metrics import count_graph_macs, count_macs, count_params, latency_ms

from conftest import set_fused, tiny_swin, tiny_vit


def small_swin():
    return tiny_swin(depths=(1, 1), num_heads=(1, 2))


def test_count_params_manual():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))
    assert count_params(model) == 4 * 5 + 5 + 5 * 3


def test_count_params_tied_weights_counted_once():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6, bias=False)
    b.weight = a.weight
    assert count_params(nn.Sequential(a, b)) == 6 * 6 + 6


def test_count_params_vit():
    model = tiny_vit()
    assert count_params(model) == sum(p.numel() for p in model.parameters()) > 0


def test_macs_linear():
    assert count_macs(nn.Linear(16, 32), (torch.randn(1, 10, 16),)) == 10 * 16 * 32


def test_macs_vit_fused_equals_unfused_attention():
    model, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    set_fused(model, True)
    fused = count_macs(model, (x,))
    set_fused(model, False)
    unfused = count_macs(model, (x,))
    # 2 blocks x (QK^T + AV): heads=3, tokens=17, head_dim=16
    attn = 2 * 2 * 3 * 17 * 17 * 16
    assert fused == unfused > attn > 0


def test_macs_swin_fused_equals_unfused_attention():
    model, x = small_swin(), torch.randn(1, 3, 56, 56)
    set_fused(model, True)
    fused = count_macs(model, (x,))
    set_fused(model, False)
    assert fused == count_macs(model, (x,)) > 0


def test_macs_graph_module_matches_module():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
    assert isinstance(gm, torch.fx.GraphModule)
    assert count_macs(gm, (x,)) == count_macs(model, (x,)) > 0


def test_metrics_restore_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    count_macs(model, (torch.randn(2, 4),))
    latency_ms(model, (torch.randn(2, 4),), warmup=0, repeats=1)
    assert model.training


def test_latency_ms():
    t = latency_ms(tiny_vit(), (torch.randn(1, 3, 32, 32),), warmup=1, repeats=3)
    assert isinstance(t, float) and t > 0
    with pytest.raises(ValueError):
        latency_ms(nn.Identity(), (torch.randn(1),), repeats=0)


@pytest.mark.parametrize("make, fused", [(tiny_vit, True), (tiny_vit, False), (small_swin, True)])
def test_graph_macs_on_meta_equal_a_real_run(make, fused):
    """count_graph_macs never runs the arithmetic, and counts what a run of the captured graph counts."""
    model = make()
    set_fused(model, fused)
    x = torch.randn(2, 3, 56, 56) if make is small_swin else torch.randn(2, 3, 32, 32)
    gm = capture(model, (x,))
    assert count_graph_macs(gm, (x,)) == count_macs(gm, (x,)) == count_macs(model, (x,)) > 0


def test_graph_macs_run_for_real_where_meta_cannot():
    """nonzero's size depends on the values: no meta kernel, so the graph is counted on a real run."""
    class Gathered(nn.Module):
        def forward(self, x):
            return torch.mm(x, x) + x.nonzero().shape[0]

    gm = torch.fx.symbolic_trace(Gathered())
    x = torch.randn(4, 4)
    assert count_graph_macs(gm, (x,)) == count_macs(gm, (x,)) == 64
