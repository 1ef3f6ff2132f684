import torch
from torch import nn

import vitcc
from vitcc.analysis.coupling import analyze
from vitcc.frontend.capture import capture
from vitcc.analysis.groups import build_groups

from conftest import image, tiny_vit


def groups_of(model, x):
    return {g.name: g for g in build_groups(analyze(capture(model, (x,))))}


def test_vit_groups_come_from_the_graph():
    groups = groups_of(tiny_vit(), image())
    kinds = {n: g.kind for n, g in groups.items()}
    assert kinds == {
        "residual": "residual",
        "blocks.0.attn.heads": "heads", "blocks.0.attn.qk_dim": "head_dim", "blocks.0.attn.v_dim": "head_dim",
        "blocks.0.mlp.hidden": "mlp",
        "blocks.1.attn.heads": "heads", "blocks.1.attn.qk_dim": "head_dim", "blocks.1.attn.v_dim": "head_dim",
        "blocks.1.mlp.hidden": "mlp",
    }
    assert groups["blocks.0.attn.heads"].size == 3 and groups["blocks.0.attn.qk_dim"].size == 16
    members = {(m.param, m.axis) for m in groups["residual"].members}
    assert {("patch_embed.proj.weight", 0), ("cls_token", 2), ("pos_embed", 2), ("norm.weight", 0),
            ("blocks.1.mlp.fc2.weight", 0), ("head.weight", 1), ("blocks.0.attn.qkv.weight", 1)} <= members
    # the classifier's outputs and the image channels are fixed, never a group
    assert not any(("head.weight", 0) == (m.param, m.axis) for g in groups.values() for m in g.members)


def test_unfused_attention_finds_the_same_groups():
    fused = groups_of(tiny_vit(fused=True), image())
    plain = groups_of(tiny_vit(fused=False), image())
    assert {n: (g.kind, g.size, g.frozen) for n, g in fused.items()} == \
           {n: (g.kind, g.size, g.frozen) for n, g in plain.items()}


class Cumsum(nn.Module):
    """An op with no coupling rule in the middle of an MLP."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.cumsum(self.fc2(h), dim=-1)
        return self.fc3(h)


def test_unknown_op_freezes_what_it_touches_and_the_rest_still_prunes():
    model = Cumsum().eval()
    x = torch.randn(3, 8)
    groups = groups_of(model, x)
    assert groups["hidden"].frozen is None
    frozen = [g for g in groups.values() if g.frozen]
    assert frozen and all("cumsum" in g.frozen for g in frozen)
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(x,))
    assert any("cumsum" in f["reason"] for f in r.report["frozen"])
    assert r.module.fc1.weight.shape[0] == 8 and r.module.fc2.weight.shape[0] == 12
    assert r.report["max_abs_error"] < 1e-5


class _Factored(nn.Module):
    """Two MLPs (a nonlinearity between two linears) and a factorised linear (two linears with only an
    eval-mode dropout between): the width between the last two is a rank, not neurons."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.down, self.drop, self.up = nn.Linear(12, 4), nn.Dropout(0.1), nn.Linear(4, 6)

    def forward(self, x):
        return self.up(self.drop(self.down(torch.tanh(self.fc2(nn.functional.gelu(self.fc1(x)))))))


def test_the_width_between_two_linears_with_nothing_between_is_a_rank():
    groups = groups_of(_Factored().eval(), torch.randn(1, 8))
    assert sorted((g.kind, g.size) for g in groups.values()) == [("mlp", 12), ("mlp", 16), ("rank", 4)]
    rank = next(g for g in groups.values() if g.kind == "rank")
    assert rank.name == "rank"  # no common module: the kind's own suffix
    assert {(m.param, m.axis) for m in rank.members} == {("down.weight", 0), ("down.bias", 0), ("up.weight", 1)}
