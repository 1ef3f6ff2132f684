"""Op-table rules found by the coverage sweep: each a tiny module using the op, compiled at S = 0.3,
checked for what is grouped or frozen, and verified."""
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
    table = vitcc.default_table()

    @table.rule(torch.ops.aten.gelu.default)
    def broken(a, node):
        raise IndexError("planted bug")

    r = _compile(model, x, rules=table)
    failed = [f for f in r.report["frozen"] if "rule for aten.gelu.default failed: IndexError: planted bug" in f["reason"]]
    assert len(failed) == 2, r.report["frozen"]
    assert r.report["max_rel_error"] < 1e-5
    assert r.report["params_after"] < r.report["params_before"]  # the residual stream still prunes


class _GroupedConvNet(nn.Module):
    """A grouped (not depthwise) conv between prunable convs: its channels freeze, its groups stay."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(16, 24, 1)
        self.c = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.g(torch.relu(self.a(x)))))))


def test_grouped_conv_is_frozen_and_keeps_its_groups():
    torch.manual_seed(0)
    r = _compile(_GroupedConvNet(), torch.randn(1, 3, 8, 8))
    assert any("grouped convolution" in f["reason"] for f in r.report["frozen"]), r.report["frozen"]
    assert r.report["max_rel_error"] < 1e-5
    assert r.report["params_after"] < r.report["params_before"]  # b's 24 outputs still prune


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
