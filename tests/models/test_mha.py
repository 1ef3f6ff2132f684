"""nn.MultiheadAttention and nn.TransformerEncoderLayer: heads, head dims and MLP neurons pruned, verified.

One model stacks blocks of every variant (packed in_proj_weight or separate q/k/v weights, batch_first or
sequence first, with or without bias, attention weights asked for or not; norm first or last), so one compile
covers them all."""
import pytest
import torch
from torch import nn

import vitcc

DIM, HEADS, HIDDEN, TOKENS = 48, 4, 96, 9


class MHABlock(nn.Module):
    """Pre-norm attention and MLP around nn.MultiheadAttention; `kdim`/`vdim` != DIM gives separate q/k/v
    weights (keys and values then come through their own Linears)."""

    def __init__(self, kdim=None, vdim=None, batch_first=True, bias=True, need_weights=False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.norm = nn.LayerNorm(DIM)
        self.to_k = nn.Linear(DIM, kdim) if kdim else nn.Identity()
        self.to_v = nn.Linear(DIM, vdim) if vdim else nn.Identity()
        self.attn = nn.MultiheadAttention(DIM, HEADS, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    def forward(self, x):  # x: (batch, tokens, DIM)
        h = self.norm(x)
        q, k, v = h, self.to_k(h), self.to_v(h)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = self.attn(q, k, v, need_weights=self.need_weights)[0]
        x = x + (out if self.batch_first else out.transpose(0, 1))
        return x + self.mlp(x)


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer in either layout."""

    def __init__(self, norm_first, batch_first, bias=True, activation="relu"):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation=activation, bias=bias,
                                                batch_first=batch_first, norm_first=norm_first)

    def forward(self, x):
        return self.layer(x) if self.batch_first else self.layer(x.transpose(0, 1)).transpose(0, 1)


class Net(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.embed = nn.Linear(16, DIM)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def mha_net(seed=0):
    torch.manual_seed(seed)
    return Net([MHABlock(batch_first=True, bias=True),
                MHABlock(batch_first=False, bias=False, need_weights=True),
                MHABlock(kdim=40, vdim=36, batch_first=True, bias=False),
                MHABlock(kdim=40, vdim=36, batch_first=False, bias=True, need_weights=True)]).eval()


def encoder_net(seed=0):
    torch.manual_seed(seed)
    return Net([EncoderLayer(norm_first=True, batch_first=True),
                EncoderLayer(norm_first=False, batch_first=False, bias=False),
                EncoderLayer(norm_first=True, batch_first=False, activation="gelu"),
                EncoderLayer(norm_first=False, batch_first=True, bias=False, activation="gelu")]).eval()


def tokens(batch=1, seed=1):
    return torch.randn(batch, TOKENS, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [mha_net, encoder_net], ids=["mha", "encoder_layer"])
def test_every_block_prunes_heads_head_dims_and_mlp(make):
    model = make()
    r = vitcc.compile(model, sparsity=0.3, example_inputs=(tokens(),))
    assert not r.report["frozen"]
    assert r.report["max_rel_error"] < 1e-4
    by_block = {}
    for g in r.groups:
        if g.name.startswith("blocks."):
            by_block.setdefault(g.name.split(".")[1], {})[g.name.rsplit(".", 1)[1]] = len(r.selection[g.name]), g.size
    assert sorted(by_block) == ["0", "1", "2", "3"]
    for block, groups in by_block.items():
        for name in ("heads", "qk_dim", "v_dim", "hidden"):
            kept, size = groups[name]
            assert kept < size, (block, name, groups)
    with torch.no_grad():
        assert r.module(tokens(5)).shape == (5, 10)


def plant(model, D=DIM // HEADS):
    """Zero head 2 of block 0 (its q, k, v rows in the packed in_proj), v dims 1 and 4 and qk dims 0 and 7 of
    every head of block 2 (separate q/k/v weights, no bias), and MLP neurons 3 and 50 of block 1."""
    in0, at2 = model.blocks[0].attn, model.blocks[2].attn
    with torch.no_grad():
        for part in range(3):
            rows = slice(part * DIM + 2 * D, part * DIM + 3 * D)
            in0.in_proj_weight[rows] = 0
            in0.in_proj_bias[rows] = 0
        for h in range(HEADS):
            at2.v_proj_weight[[h * D + 1, h * D + 4]] = 0
            for w in (at2.q_proj_weight, at2.k_proj_weight):
                w[[h * D + 0, h * D + 7]] = 0
        fc1 = model.blocks[1].mlp[1]
        fc1.weight[[3, 50]] = 0
        fc1.bias[[3, 50]] = 0


def test_planted_zeros_give_back_the_original_mha_model():
    model = mha_net()
    plant(model)
    x = tokens(3)
    with torch.no_grad():
        want = model(x)
    D = DIM // HEADS
    keep = {"blocks.0.attn.heads": [0, 1, 3],
            "blocks.2.attn.v_dim": [d for d in range(D) if d not in (1, 4)],
            "blocks.2.attn.qk_dim": [d for d in range(D) if d not in (0, 7)],
            "blocks.1.mlp.hidden": [j for j in range(HIDDEN) if j not in (3, 50)]}
    r = vitcc.compile(model, keep=keep, example_inputs=(tokens(),))
    with torch.no_grad():
        got = r.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    m = r.module
    assert m.get_submodule("blocks.0.attn").in_proj_weight.shape == (3 * 3 * D, DIM)
    assert m.get_submodule("blocks.2.attn").v_proj_weight.shape == (HEADS * (D - 2), 36)
    assert m.get_submodule("blocks.2.attn").q_proj_weight.shape == (HEADS * (D - 2), DIM)
    assert m.get_submodule("blocks.1.mlp.1").weight.shape == (HIDDEN - 2, DIM)
