"""vtp: gates inserted into the graph, L1 sparsity training, one global threshold, exact folding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitcc
from conftest import analyzed, hand_vit, image, tiny_vit
from vitcc.passes.vtp import fold_gates, gate_params, insert_gates


pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {"timm_fused": lambda: tiny_vit(fused=True), "timm_unfused": lambda: tiny_vit(fused=False),
          "hand_separate_qkv_softmax": lambda: hand_vit(qkv="separate", attention="softmax")}


@pytest.mark.parametrize("model", MODELS)
def test_gates_fold_exactly(model):
    x = image(batch=4)
    m = MODELS[model]()
    p = analyzed(m, x)
    with torch.no_grad():
        want = p.gm(x)
    groups = [g for g in p.groups if g.kind in ("head_dim", "mlp")]
    code_before, n_before = p.gm.code, len(p.gm.graph.nodes)
    placed = insert_gates(p, groups)
    assert set(placed) == {g.name for g in groups}  # q/k dims, v dims (proj input), MLP hidden; no residual
    with torch.no_grad():
        assert torch.allclose(p.gm(x), want, atol=1e-6)  # gates start at 1: the identity
        gen = torch.Generator().manual_seed(0)
        for gate in gate_params(p, placed).values():
            gate.copy_(torch.rand(gate.shape, generator=gen) * 2 - 0.5)  # some negative, some zero-ish
        gated = p.gm(x)
    aten = torch.ops.aten
    gated_ops = [n for n in p.gm.graph.nodes if n.target is aten.mul.Tensor
                 and getattr(n.args[1], "target", None) is aten.index_select.default]
    assert len(gated_ops) == sum(len(v) for v in placed.values())  # a gate after each producing linear
    fold_gates(p, placed)
    assert len(p.gm.graph.nodes) == n_before and p.gm.code == code_before  # no trace of the gates
    names = [n for n, _ in [*p.gm.named_modules(), *p.gm.named_parameters(), *p.gm.named_buffers()]]
    assert not any("vtp_gate" in n for n in names)
    with torch.no_grad():
        folded = p.gm(x)
    assert torch.allclose(folded, gated, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(folded, want, atol=1e-3)


def test_needs_data_and_at_least_one_epoch(digits):
    with pytest.raises(vitcc.VitccError, match="training data"):
        vitcc.compile(tiny_vit(), "vtp", sparsity=0.3, example_inputs=(image(),))
    with pytest.raises(vitcc.VitccError, match="at least one epoch"):
        vitcc.compile(tiny_vit(), "vtp{epochs=0}", sparsity=0.3, example_inputs=(image(),), data=digits)


def test_compile_trains_gates_verifies_and_is_deterministic(digits):
    m = tiny_vit()
    x = image()
    runs = [vitcc.compile(m, "vtp{epochs=1,lam=0.01}", sparsity=0.4, target="params", example_inputs=(x,),
                          data=digits, seed=1) for _ in range(2)]
    a, b = runs
    assert a.report["max_abs_error"] < 1e-4
    assert all(np.array_equal(a.selection[k], b.selection[k]) for k in a.selection)
    assert all(torch.equal(u, v) for u, v in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    w = a.report["widths"]
    assert w["residual"]["after"] == w["residual"]["before"] and w["heads"]["after"] == w["heads"]["before"]
    fams = a.program.options["families"]
    gated = [n for n, src in a.report["score_source"].items() if src == "vtp"]
    assert sorted(gated) == sorted(g.name for g in a.groups if g.kind in ("head_dim", "mlp"))
    assert {fams[n][0] for n in gated} == {"vtp"}  # one global threshold over all gates
    assert all(v < 1.0 for v in a.report["vtp"]["mean_gate"].values())  # the L1 term pulled gates down
    assert not any("vtp_gate" in n for n, _ in a.module.named_modules())
    # per-head balance: q/k and v head dims of a block keep the same count in every head
    for i in range(2):
        assert len(a.selection[f"blocks.{i}.attn.qk_dim"]) == len(a.selection[f"blocks.{i}.attn.v_dim"])


def test_norm_scores_ablation(digits):
    r = vitcc.compile(tiny_vit(), "vtp{epochs=1,scores=norm}", sparsity=0.3, example_inputs=(image(),),
                      data=digits)
    assert r.report["max_abs_error"] < 1e-4
    assert "vtp" not in {f for f, _ in r.program.options.get("families", {}).values()}


def test_tied_gates_never_remove_more_than_asked():
    from vitcc import Pass, PassResult
    from vitcc.passes._common import claim

    class TiedGates(Pass):  # e.g. gates that training did not move: one family, all scores equal
        name = "tied-gates"

        def run(self, program):
            for g in program.groups:
                if g.kind == "mlp":
                    claim(program, "vtp", g.name, torch.ones(g.size), family="vtp")
            return PassResult()
    r = vitcc.compile(tiny_vit(), [TiedGates()], sparsity=0.25, prune="mlp", example_inputs=(image(),))
    assert sum(len(r.selection[f"blocks.{i}.mlp.hidden"]) for i in range(2)) == 384 - 96
