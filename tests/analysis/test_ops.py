"""Op-table rules found by the coverage sweep: each a tiny module using the op, compiled at S = 0.3,
checked for what is grouped or frozen, and verified."""
from dataclasses import replace

import pytest
import timm
import torch
from torch import nn

import vitcc


def _compile(model, x, **kw):
    return vitcc.compile(model.eval(), "magnitude", sparsity=0.3, example_inputs=(x,), **kw)


class _Mlp(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_a_rule_that_raises_freezes_its_node_and_the_rest_still_prunes():
    """Never crash: an exception inside a coupling rule freezes what the node touches, named in the report."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 16), _Mlp(), _Mlp(), nn.Linear(16, 4)), torch.randn(1, 5, 16)

    @vitcc.rule(torch.ops.aten.gelu.default)
    def broken(a, node):
        raise IndexError("planted bug")

    r = _compile(model, x, rules=[broken])
    failed = [f for f in r.report["frozen"] if "rule for aten.gelu.default failed: IndexError: planted bug" in f["reason"]]
    assert len(failed) == 2, r.report["frozen"]
    assert r.report["max_rel_error"] < 1e-5
    assert r.report["params_after"] < r.report["params_before"]  # the residual stream still prunes
    assert vitcc.default_table().get(torch.ops.aten.gelu.default).coupling is not broken  # nothing global changed
    with pytest.raises(vitcc.VitccError, match="not marked with @vitcc.rule"):
        _compile(model, x, rules=[lambda a, node: None])


class _GroupedConvNet(nn.Module):
    """A grouped (not depthwise) conv between prunable convs, with a grouped norm after it."""

    def __init__(self, groups=4, norm_groups=4):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=groups)
        self.n = nn.GroupNorm(norm_groups, 32)
        self.b = nn.Conv2d(32, 8, 1)
        for p in self.n.parameters():
            nn.init.normal_(p)

    def forward(self, x):
        return self.b(torch.relu(self.n(self.g(torch.relu(self.a(x))))))


def test_grouped_conv_and_group_norm_prune_the_channels_of_every_group_alike():
    """G groups of C/G channels: the groups stay and the per-group channels are pruned, the same positions in
    every group, so the compact conv keeps G groups and the compact norm its per-group statistics."""
    torch.manual_seed(0)
    r = _compile(_GroupedConvNet(), torch.randn(1, 3, 8, 8))
    assert r.report["frozen"] == [] and all(g["frozen"] is None for g in r.report["groups"])
    assert r.report["max_rel_error"] < 1e-5
    w = dict(r.module.named_parameters())["g.weight"]
    assert w.shape[0] < 32 and w.shape[0] % 4 == 0 and w.shape[1] < 4  # per-group outputs and inputs pruned
    assert r.module(torch.randn(3, 3, 8, 8)).shape == (3, 8, 8, 8)


def test_group_norm_with_one_channel_per_group_removes_groups_and_one_group_is_a_layer_norm():
    torch.manual_seed(0)
    for norm_groups in (32, 1):
        r = _compile(_GroupedConvNet(groups=1, norm_groups=norm_groups), torch.randn(1, 3, 8, 8))
        assert r.report["frozen"] == [], r.report["frozen"]
        assert r.report["max_rel_error"] < 1e-5
        assert dict(r.module.named_parameters())["n.weight"].shape[0] < 32


class _Outlook(nn.Module):
    """VOLO's outlook attention: weights over k*k kernel positions come from a Linear, values from unfold,
    and fold (col2im) sums the windows back: the kernel positions are positions, the heads and channels
    around them prune."""

    def __init__(self, dim=16, heads=2, k=3):
        super().__init__()
        self.heads, self.k = heads, k
        self.v = nn.Linear(dim, dim)
        self.attn = nn.Linear(dim, heads * k ** 4)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        k, hd = self.k, c // self.heads
        v = self.v(x).permute(0, 3, 1, 2)
        v = nn.functional.unfold(v, k, padding=1).reshape(b, self.heads, hd, k * k, h * w).permute(0, 1, 4, 3, 2)
        a = self.attn(x).reshape(b, h * w, self.heads, k * k, k * k).permute(0, 2, 1, 3, 4).softmax(-1)
        y = (a @ v).permute(0, 1, 4, 3, 2).reshape(b, c * k * k, h * w)
        y = nn.functional.fold(y, (h, w), k, padding=1)
        return x + self.proj(y.permute(0, 2, 3, 1))


def test_fold_fixes_kernel_positions_that_a_linear_produced_and_prunes_the_rest():
    torch.manual_seed(0)
    r = _compile(nn.Sequential(_Outlook(), nn.LayerNorm(16)), torch.randn(1, 4, 4, 16))
    assert r.report["frozen"] == [], r.report["frozen"]  # the softmax over kernel positions freezes nothing
    kinds = {g["kind"] for g in r.report["groups"]}
    assert {"heads", "head_dim"} <= kinds, kinds
    assert r.report["max_rel_error"] < 1e-5
    assert r.report["params_after"] < r.report["params_before"]


class _ConvBNPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = nn.functional.avg_pool2d(torch.relu(self.n1(self.c1(x))), 3, 1, 1)
        x = torch.relu(self.n2(self.c2(x))).view(x.shape[0], 24, -1).view(x.shape[0], 24, 8, 8)
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_batch_norm_pooling_and_views_pass_channels():
    """One TensorMetadata is a NamedTuple: batch_norm/pool outputs are single tensors, not (values, indices)."""
    torch.manual_seed(0)
    model = _ConvBNPool()
    for m in (model.n1, model.n2):
        m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    r = _compile(model, torch.randn(1, 3, 8, 8))
    assert not r.report["frozen"], r.report["frozen"]
    assert {g.size for g in r.groups} == {16, 24} and not [g for g in r.groups if g.frozen]
    assert r.report["max_rel_error"] < 1e-5


class _Resample(nn.Module):
    """Upsampling and Tensor.unfold windows (halo attention) between prunable convs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 24, 1), nn.Linear(24 * 4, 4)

    def forward(self, x):
        x = nn.functional.interpolate(torch.relu(self.c1(x)), scale_factor=2.0, mode="bilinear")
        x = nn.functional.interpolate(self.c2(x), scale_factor=0.5, mode="nearest")  # (1, 24, 8, 8)
        w = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (1, 24, 2, 2, 4, 4) windows
        return self.head(w.amax((-1, -2)).flatten(1))


def test_upsample_and_unfold_windows_pass_channels():
    torch.manual_seed(0)
    r = _compile(_Resample(), torch.randn(1, 3, 8, 8))
    assert not r.report["frozen"], r.report["frozen"]
    assert sorted(g.size for g in r.groups) == [16, 24]
    assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]


class _ResampledPosTable(nn.Module):
    """A 4x4 position table resampled to the 8x8 grid (naflexvit, qwen3): its grid axes are positions."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 4, 4))
        self.norm, self.fc, self.head = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.proj(x) + nn.functional.interpolate(self.pos, size=(8, 8), mode="bilinear")
        x = x.flatten(2).transpose(1, 2)
        x = x + self.fc(self.norm(x))
        return self.head(x.mean(1))


def test_a_resampled_position_table_has_positions_not_channels():
    torch.manual_seed(0)
    r = _compile(_ResampledPosTable(), torch.randn(1, 3, 32, 32))
    assert r.report["frozen"] == [] and [g["kind"] for g in r.report["groups"]] == ["residual"]
    assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]


class _HandNorm2d(nn.Module):
    """Channel norms written by hand (mobilenetv5's RmsNorm2d, a LayerNorm2d by mean and var, a max)."""

    def __init__(self, c, kind):
        super().__init__()
        self.kind, self.w = kind, nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.w
        if self.kind == "ln":
            return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-6) * self.w
        if self.kind == "std":
            return x / (x.std(1, keepdim=True) + 1) * self.w
        return x - x.amax(1, keepdim=True) + x.amin(dim=(1, 2), keepdim=True) * self.w


class _HandNormNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.a, self.n, self.b = nn.Conv2d(3, 16, 3, padding=1), _HandNorm2d(16, kind), nn.Conv2d(16, 16, 1)
        self.n2, self.head = _HandNorm2d(16, kind), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.n(self.a(x))
        return self.head(x + self.b(torch.relu(self.n2(x)))).mean((2, 3))


def test_mean_var_and_max_over_channels_take_the_kept_channels_like_a_norm():
    """Masked semantics of a statistic over channels: over the kept ones (what the compact model computes).
    Without it verify fails: zeros still counted in a mean are not removal."""
    for kind in ("rms", "ln", "std", "max"):
        torch.manual_seed(0)
        r = _compile(_HandNormNet(kind), torch.randn(1, 3, 8, 8))
        assert r.report["frozen"] == [], (kind, r.report["frozen"])
        assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]
    table = vitcc.default_table()
    table.entries[torch.ops.aten.mean] = replace(table.entries[torch.ops.aten.mean], masked=None)
    with pytest.raises(vitcc.errors.VerificationError):
        _compile(_HandNormNet("rms"), torch.randn(1, 3, 8, 8), rules=table)


class _StateConv(nn.Module):
    """A pruned feature axis moved onto a conv's length axis (efficientvim's state dimension)."""

    def __init__(self, k=1):
        super().__init__()
        self.proj, self.conv, self.out = nn.Linear(16, 12), nn.Conv1d(4, 6, k, padding=k // 2), nn.Linear(12, 3)

    def forward(self, x):  # (B, 4, 16)
        return self.out(torch.relu(self.conv(self.proj(x))))


def test_conv_length_axis_with_channels_passes_pointwise_and_freezes_windows():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16)
    r = _compile(_StateConv(k=1), x)
    assert [g.size for g in r.groups if g.frozen is None] == [12] and not r.report["frozen"]
    assert r.report["params_after"] < r.report["params_before"] and r.report["max_rel_error"] < 1e-5
    r = _compile(_StateConv(k=3), x)
    assert any("window over a channel axis" in f["reason"] for f in r.report["frozen"]), r.report["frozen"]
    assert r.report["params_after"] == r.report["params_before"] and r.report["max_rel_error"] < 1e-5


def test_verify_compares_values_before_in_place_ops_change_them():
    """resnest: `x = bn3(conv3(x)); x += shortcut` (add_ mutates bn3's output, zero-init bn3): verify compares
    what bn3 produced, not the sum written over it later. Split attention's softmax runs over the radix, which
    the grouped convs fix as their groups: nothing is frozen."""
    torch.manual_seed(0)
    model = timm.create_model("resnest14d", pretrained=False, num_classes=10)
    r = _compile(model, torch.randn(1, 3, 32, 32))
    assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]
    assert r.report["frozen"] == [], r.report["frozen"]


class _SlicedPosEmbed(nn.Module):
    """timm's test_vit: pos_embed[:, :1] for the class token, pos_embed[:, 1:] for patches (resampled)."""

    def __init__(self, dim=16):
        super().__init__()
        self.proj, self.cls = nn.Conv2d(3, dim, 4, 4), nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + 4, dim))
        self.mlp, self.head = _Mlp(dim, 32), nn.Linear(dim, 4)

    def forward(self, x):  # (B, 3, 16, 16): 4x4 patches, pos table of 2x2 resampled bicubic (antialiased)
        t = self.proj(x).flatten(2).transpose(1, 2)
        grid = self.pos[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True)
        t = t + grid.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1) + self.pos[:, :1], t], 1)
        return self.head(self.mlp(t)[:, 0])


def test_a_parameter_sliced_by_position_keeps_its_channels_prunable():
    torch.manual_seed(0)
    r = _compile(_SlicedPosEmbed(), torch.randn(1, 3, 16, 16))
    assert not r.report["frozen"], r.report["frozen"]
    assert sorted(g.size for g in r.groups if g.frozen is None) == [16, 32]
    assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]


class _Decoder(nn.Module):
    """A transposed conv (lowformer's upsampling) and an in-place dropout (tnt) between prunable layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.up = nn.Conv2d(3, 16, 1), nn.ConvTranspose2d(16, 24, 2, 2)
        self.drop, self.head = nn.Dropout(0.1, inplace=True), nn.Linear(24, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.up(torch.relu(self.c1(x)))))
        return self.head(h.mean((2, 3)))


def test_conv_transpose_and_in_place_dropout_pass_channels():
    torch.manual_seed(0)
    r = _compile(_Decoder(), torch.randn(1, 3, 8, 8), prune="other")  # plain conv channels: kind `other`
    assert not r.report["frozen"], r.report["frozen"]
    assert sorted(g.size for g in r.groups if g.frozen is None) == [16, 24]
    assert r.report["max_rel_error"] < 1e-5 and r.report["params_after"] < r.report["params_before"]
