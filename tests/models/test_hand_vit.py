"""Hand-written ViTs (no timm, no transformers): planted zeros give back the original, hypothesis over the
family (fused/separate q/k/v or MHA; SDPA, softmax or einsum; class token or mean pooling; patches by conv,
F.unfold, Tensor.unfold or reshape) with random explicit selections, and a compact model fine-tunes."""
import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vitcc
from vitcc.frontend.capture import capture
from vitcc.ir.program import Program
from vitcc.pipeline.manager import make_pass
from vitcc.ir.spaces import find

from conftest import ATTENTIONS, PATCHES, QKV_FORMS, hand_vit, image, one_training_step


def plant(model, D=16, C=48):
    """Zero head 0 of block 1, v dims 2 and 11 and qk dims 5 and 6 of block 0, MLP neurons 7 and 40 of block 1."""
    b0, b1 = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        for proj in (b1.q, b1.k, b1.v):
            proj.weight[:D] = 0
            proj.bias[:D] = 0
        for h in range(C // D):
            for proj, dims in ((b0.v, (2, 11)), (b0.q, (5, 6)), (b0.k, (5, 6))):
                proj.weight[[h * D + d for d in dims]] = 0
                proj.bias[[h * D + d for d in dims]] = 0
        fc1 = model.blocks[1].mlp[0]
        fc1.weight[[7, 40]] = 0
        fc1.bias[[7, 40]] = 0


def test_planted_zeros_give_back_the_original_hand_vit():
    model = hand_vit(qkv="separate", attention="softmax", cls_token=False, patches="unfold")
    plant(model)
    x = image(3)
    with torch.no_grad():
        want = model(x)
    keep = {"blocks.1.attn.heads": [1, 2],
            "blocks.0.attn.v_dim": [d for d in range(16) if d not in (2, 11)],
            "blocks.0.attn.qk_dim": [d for d in range(16) if d not in (5, 6)],
            "blocks.1.mlp.hidden": [j for j in range(96) if j not in (7, 40)]}
    r = vitcc.compile(model, keep=keep, example_inputs=(image(1),))
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), want, rtol=1e-5, atol=1e-5)
    assert r.module.get_submodule("blocks.1.attn.q").weight.shape == (32, 48)
    assert r.module.get_submodule("blocks.0.attn.v").weight.shape == (42, 48)
    assert r.module.get_submodule("blocks.1.mlp.0").weight.shape == (94, 48)


def random_selection(gm, x, rng) -> dict:
    """Random kept indices for every prunable group of a captured graph; groups that share one fused reshape
    (q, k and v of one qkv Linear) keep equally many."""
    program = Program(gm=gm, example_inputs=(x,))
    make_pass("analyze").run(program)
    groups = [g for g in program.groups if g.prunable]
    counts = {g.name: int(rng.integers(1, g.size + 1)) for g in groups}
    by_root = {find(g.space).id: g.name for g in groups}
    for spaces in program.coupling.equal_counts:
        tied = [by_root[find(s).id] for s in spaces if find(s).id in by_root]
        for name in tied:
            counts[name] = min(counts[n] for n in tied)
    return {g.name: sorted(rng.choice(g.size, counts[g.name], replace=False).tolist()) for g in groups}


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(qkv=st.sampled_from(QKV_FORMS), attention=st.sampled_from(ATTENTIONS), cls_token=st.booleans(),
       patches=st.sampled_from(PATCHES), heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8]),
       depth=st.integers(1, 2), seed=st.integers(0, 999))
@example(qkv="mha", attention="sdpa", cls_token=False, patches="conv", heads=1, head_dim=4, depth=1, seed=120)
def test_hand_vit_family_with_random_selections_verifies(qkv, attention, cls_token, patches, heads, head_dim,
                                                         depth, seed):
    model = hand_vit(seed=seed, dim=heads * head_dim, heads=heads, depth=depth, hidden=2 * heads * head_dim,
                     img_size=16, qkv=qkv, attention=attention, cls_token=cls_token, patches=patches)
    x = image(1, size=16)
    gm = capture(model, (x,))
    keep = random_selection(gm, x, np.random.default_rng(seed))
    assert any(name.endswith(".hidden") for name in keep)
    r = vitcc.compile(gm, keep=keep, example_inputs=(x,))  # the captured graph: capture runs once
    assert r.report["max_rel_error"] < 1e-4
    assert not r.report["frozen"]
    for name, kept in keep.items():
        assert r.selection[name].tolist() == kept
    with torch.no_grad():
        assert r.module(image(3, size=16)).shape == (3, 10)


def test_a_compact_model_fine_tunes_one_step(one_thread):
    r = vitcc.compile(hand_vit(qkv="mha", cls_token=False, patches="reshape"), sparsity=0.4,
                      example_inputs=(image(1),))
    x = image(8)
    one_training_step(r.module, x, torch.arange(8) % 10)
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), r.module(x))  # eval mode again: deterministic


class SlicedGLU(torch.nn.Module):
    """An MLP whose fc1 output is cut by hand into a value half and a gate half (x[..., :h], x[..., h:]), then
    a third slice feeds a side branch: contiguous slices of a channel axis are parts of a concatenation."""

    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.hidden = hidden
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * hidden + 8), torch.nn.Linear(hidden, dim)
        self.side = torch.nn.Linear(8, dim)

    def forward(self, x):
        h = self.fc1(x)
        value, gate, rest = h[..., :self.hidden], h[..., self.hidden:2 * self.hidden], h[..., 2 * self.hidden:]
        return self.fc2(value * torch.nn.functional.silu(gate)) + self.side(rest)


def test_contiguous_slices_of_a_channel_axis_prune_as_parts():
    torch.manual_seed(0)
    model, x = SlicedGLU().eval(), torch.randn(1, 5, 16)
    r = vitcc.compile(model, sparsity=0.5, example_inputs=(x,))
    assert not r.report["frozen"] and r.report["max_rel_error"] < 1e-4
    assert r.module.fc1.weight.shape[0] == 12 + 12 + 4 and r.module.fc2.weight.shape[1] == 12
    assert r.module.side.weight.shape[1] == 4
    with torch.no_grad():
        assert r.module(torch.randn(3, 5, 16)).shape == (3, 5, 16)
