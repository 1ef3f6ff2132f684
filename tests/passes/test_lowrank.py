"""lowrank: SVD of the attention projections into two Linears (never more parameters), lighter MLP pruning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import vitcc
from conftest import image, tiny_vit
from vitcc.training.data import make_loaders
from vitcc.passes.lowrank import break_even, choose_rank, factorise


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_frobenius_error_is_the_discarded_energy(rank):
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    down, up, S = factorise(W, rank)
    assert down.shape == (rank, 96) and up.shape == (64, rank)
    err = (W - up @ down).pow(2).sum()
    assert torch.allclose(err, S[rank:].pow(2).sum(), rtol=1e-9)


def test_rank_choice_never_adds_parameters():
    for i, o in [(48, 144), (48, 48), (96, 384), (2, 2), (1, 10), (3, 1000)]:
        r = break_even(i, o)
        assert r * (i + o) < i * o <= (r + 1) * (i + o)
    S = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    # energy: 16, 4, 1, 1, .25, .01 of 22.26 -> 0.9 is reached at rank 3 (21/22.26 = 0.943)
    assert choose_rank(S, 6, 1000, energy=0.9) == 3
    assert choose_rank(S, 6, 1000, energy=1.0) == 5  # capped by the break-even rank of 6 x 1000
    assert choose_rank(S, 6, 1000, rank_ratio=0.5) == 2


def test_budget_mode_verifies_and_meets_the_target_against_the_dense_model():
    m = tiny_vit()
    x = image()
    r = vitcc.compile(m, "lowrank", sparsity=0.4, target="params", example_inputs=(x,))
    assert r.report["max_abs_error"] < 1e-4
    assert 1 - r.report["params_after"] / r.report["params_before"] >= 0.4
    lr = r.program.options["lowrank"]
    assert len(lr["rank_groups"]) == 4  # qkv and proj of two blocks
    names = dict(r.module.named_modules())
    assert "blocks.0.attn.qkv.down" in names and "blocks.0.attn.proj.up" in names
    rank_frac = np.mean([1 - len(r.selection[g]) / r.program.group(g).size for g in lr["rank_groups"]])
    mlp_frac = np.mean([1 - len(r.selection[f"blocks.{i}.mlp.hidden"]) / 192 for i in range(2)])
    assert 0 < mlp_frac < rank_frac and abs(mlp_frac - 0.5 * rank_frac) < 0.03  # lighter MLP pruning
    w = r.report["widths"]
    assert w["heads"]["after"] == w["heads"]["before"] and w["residual"]["after"] == w["residual"]["before"]
    # the compact model is plain torch: it saves and loads through the safe unpickler
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        vitcc.save(r.module, os.path.join(d, "m.pt2"))
        back = vitcc.load(os.path.join(d, "m.pt2"), trust_pickle=True)
    with torch.no_grad():
        assert torch.allclose(back(x), r.module(x))


def test_energy_mode_fixes_ranks_and_never_adds_parameters():
    m = tiny_vit()
    x = image()
    r = vitcc.compile(m, "lowrank{energy=0.9}", sparsity=0.0, example_inputs=(x,))
    for t, info in r.program.options["lowrank"]["projections"].items():
        assert info["energy_kept"] >= 0.9 or info["rank"] == info["break_even"]
        assert info["params_after"] < info["params_before"]
        assert abs(info["relative_fro_error"] ** 2 - (1 - info["energy_kept"])) < 1e-6
    for g in r.program.options["lowrank"]["rank_groups"]:
        assert r.program.group(g).frozen and len(r.selection.get(g, range(r.program.group(g).size))) == r.program.group(g).size
    assert r.report["params_after"] < r.report["params_before"]
    assert r.report["max_abs_error"] < 1e-4


def test_lowrank_must_come_first():
    with pytest.raises(vitcc.VitccError, match="first"):
        vitcc.compile(tiny_vit(), "magnitude,lowrank", sparsity=0.3, example_inputs=(image(),))


def test_hybrid_with_vtp_gates_on_the_mlp_verifies_and_is_deterministic():
    train, val = make_loaders("digits", (3, 32, 32), batch_size=64, seed=0)
    small = DataLoader(Subset(train.dataset, range(0, len(train.dataset), 5)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    m = tiny_vit()
    runs = [vitcc.compile(m, "lowrank,vtp{epochs=1}", sparsity=0.4, target="params", example_inputs=(image(),),
                          data=(small, val), seed=2) for _ in range(2)]
    a, b = runs
    assert a.report["max_abs_error"] < 1e-4
    assert all(np.array_equal(a.selection[k], b.selection[k]) for k in a.selection)
    src = a.report["score_source"]
    assert src["blocks.0.mlp.hidden"] == "vtp" and src["blocks.0.attn.qkv.rank"] == "lowrank:rank"
    assert 1 - a.report["params_after"] / a.report["params_before"] >= 0.4


@pytest.mark.parametrize("passes", ["gohsp,dimap", "lowrank,vtp{epochs=1}"])
def test_methods_run_from_the_command_line_on_offline_data(tmp_path, passes):
    import json
    from vitcc.cli import run
    src, out, rep = tmp_path / "model.pt", tmp_path / "small.pt2", tmp_path / "report.json"
    torch.save(tiny_vit(), src)
    code = run(["compile", str(src), "--passes", passes, "--sparsity", "0.3", "--data", "digits", "--batch-size",
                "256", "--input-shape", "1,3,32,32", "-o", str(out), "--report", str(rep)])
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["max_abs_error"] < 1e-4 and report["params_after"] < report["params_before"]
    w = report["widths"]
    assert w["residual"]["after"] == w["residual"]["before"]  # no --prune: the methods' own kinds
    first = passes.split(",")[0].split("{")[0]
    assert any(v.startswith(first) for v in report["score_source"].values())
    x = torch.randn(1, 3, 32, 32)
    assert vitcc.load(out, trust_pickle=True)(x).shape == (1, 10)


class _Encoder(torch.nn.Module):
    """nn.TransformerEncoder on token features: attention through nn.MultiheadAttention's packed in_proj."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(48, 3, 96, dropout=0.0, batch_first=True)
        self.emb = torch.nn.Linear(12, 48)
        self.layers = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.head(self.layers(self.emb(x)).mean(1))


def test_multihead_attention_packed_projections_are_factorised():
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    r = vitcc.compile(_Encoder().eval(), "lowrank", sparsity=0.3, example_inputs=(x,))
    assert r.report["max_abs_error"] < 1e-4
    assert set(r.program.options["lowrank"]["projections"]) == {
        f"layers.layers.{i}.self_attn.{p}" for i in range(2) for p in ("in_proj", "out_proj")}
    names = dict(r.module.named_parameters())
    assert "layers.layers.0.self_attn.in_proj.up.bias" in names
    assert not any(n.endswith("in_proj_weight") for n in names)
