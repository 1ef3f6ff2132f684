"""An einops ViT (Rearrange patches, rearrange heads, einsum attention): captured and pruned from the graph alone."""
import pytest
import torch
from torch import nn

import vitcc

from conftest import image

einops = pytest.importorskip("einops")
from einops import rearrange  # noqa: E402
from einops.layers.torch import Rearrange  # noqa: E402


class EinopsAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5).softmax(-1)
        return self.out(rearrange(torch.einsum("bhij,bhjd->bhid", attn, v), "b h n d -> b n (h d)"))


class EinopsViT(nn.Module):
    def __init__(self, dim=48, heads=4, depth=2, patch=8, img=32):
        super().__init__()
        self.to_patch = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
                                      nn.Linear(3 * patch * patch, dim))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim))
        self.blocks = nn.ModuleList(nn.ModuleList([nn.LayerNorm(dim), EinopsAttention(dim, heads), nn.LayerNorm(dim),
                                                   nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                 nn.Linear(2 * dim, dim))]) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.to_patch(x) + self.pos
        for norm1, attn, norm2, mlp in self.blocks:
            x = x + attn(norm1(x))
            x = x + mlp(norm2(x))
        return self.head(self.norm(x).mean(1))


def test_einops_vit_prunes_every_kind_with_verified_equivalence():
    torch.manual_seed(0)
    r = vitcc.compile(EinopsViT().eval(), "magnitude", sparsity=0.5, example_inputs=(image(1),))
    assert not r.report["frozen"]
    assert all(w["after"] < w["before"] for w in r.report["widths"].values()), r.report["widths"]
    assert r.report["max_rel_error"] < 1e-5
    assert r.module(image(3)).shape == (3, 10)
