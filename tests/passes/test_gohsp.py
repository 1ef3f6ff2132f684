"""gohsp: Markov-chain head ranking from calibration data, and the ADMM sparsity stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitcc
from conftest import analyzed, image, tiny_vit
from vitcc.passes.gohsp import attention_outputs, head_graph, markov_ranking


pytestmark = pytest.mark.usefixtures("one_thread")


def test_needs_calibration_data():
    with pytest.raises(vitcc.VitccError, match="calibration data"):
        vitcc.compile(tiny_vit(), "gohsp", sparsity=0.3, example_inputs=(image(),))


@pytest.mark.parametrize("fused", [True, False])
def test_finds_one_attention_output_per_block(fused):
    p = analyzed(tiny_vit(depth=3, fused=fused), image())
    found = attention_outputs(p)
    assert [g.name for g, _, _ in found] == [f"blocks.{i}.attn.heads" for i in range(3)]
    nodes = {n.name: n for n in p.gm.graph.nodes}
    for g, name, axis in found:
        assert axis == 1  # (batch, heads, tokens, head dim)
        assert (nodes[name].target is torch.ops.aten.scaled_dot_product_attention.default) == fused


def test_pagerank_is_the_stationary_distribution_of_the_teleporting_chain():
    rng = np.random.default_rng(0)
    layers = [(type("G", (), {"name": f"l{i}", "size": 3})(), 3) for i in range(3)]
    weights = [rng.random((3, 3)) for _ in range(2)]
    scores = markov_ranking(layers, weights, alpha=0.85, direction="both")
    n = 9
    W = np.zeros((n, n))
    for l, w in enumerate(weights):
        W[3 * l:3 * l + 3, 3 * l + 3:3 * l + 6] = w
        W[3 * l + 3:3 * l + 6, 3 * l:3 * l + 3] = w.T
    P = 0.85 * W / W.sum(1, keepdims=True) + 0.15 / n
    pi = np.ones(n) / n
    for _ in range(2000):
        pi = pi @ P
    got = np.concatenate([scores[f"l{i}"].numpy() for i in range(3)])
    assert np.allclose(got, pi, atol=1e-8) and abs(got.sum() - 1) < 1e-9


def test_a_dead_head_ranks_last_and_is_pruned():
    m = tiny_vit(depth=3)
    d = 16
    with torch.no_grad():  # head 1 of block 1: its v rows are zero, so its output is zero
        rows = slice(2 * 48 + d, 2 * 48 + 2 * d)
        m.blocks[1].attn.qkv.weight[rows] = 0
        m.blocks[1].attn.qkv.bias[rows] = 0
    x = image(batch=32, seed=5)
    p = analyzed(m, x)
    layers, weights = head_graph(p, x)
    assert np.allclose(weights[0][:, 1], 0) and np.allclose(weights[1][1, :], 0)
    scores = markov_ranking(layers, weights)
    assert int(torch.argmin(scores["blocks.1.attn.heads"])) == 1

    from vitcc import Insertion, Pass, PassResult

    class GiveCalibration(Pass):
        name = "give-calibration"

        def run(self, program):
            program.options["calibration"] = x
            return PassResult(modified=False)
    r = vitcc.compile(m, "gohsp", sparsity=0.34, prune="heads", example_inputs=(x[:2],),
                      insert=[Insertion(GiveCalibration(), after="analyze")])
    assert list(r.selection["blocks.1.attn.heads"]) == [0, 2]
    assert r.report["score_source"]["blocks.1.attn.heads"] == "gohsp"


def test_admm_stage_verifies_and_is_deterministic(digits):
    m = tiny_vit()
    x = image(batch=2)
    runs = [vitcc.compile(m, "gohsp{epochs=1}", sparsity=0.4, target="params", example_inputs=(x,),
                          data=digits, seed=3) for _ in range(2)]
    a, b = runs
    assert a.report["max_abs_error"] < 1e-4
    assert all(np.array_equal(a.selection[k], b.selection[k]) for k in a.selection)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    info = next(p for p in a.report["passes"] if p["name"] == "gohsp")
    assert info["modified"]
    # stage 2 trained the weights on purpose: the masked reference is the trained model, not the input
    assert not torch.equal(a.program.original.get_parameter("blocks.0.mlp.fc1.weight"), m.blocks[0].mlp.fc1.weight)
    assert a.report["score_source"]["blocks.0.mlp.hidden"] == "gohsp"  # stage 2 owns what it trained
    assert 1 - a.report["params_after"] / a.report["params_before"] >= 0.4


def test_norm_ranking_needs_no_data_and_differs_from_markov(digits):
    m = tiny_vit(depth=3)
    r = vitcc.compile(m, "gohsp{ranking=norm}", sparsity=0.34, prune="heads", example_inputs=(image(),))
    assert r.report["max_abs_error"] < 1e-4
    with pytest.raises(vitcc.VitccError, match="ranking"):
        vitcc.compile(m, "gohsp{ranking=bogus}", sparsity=0.3, example_inputs=(image(),), data=digits)
