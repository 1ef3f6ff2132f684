"""dimap: data-free module-aware distortion scores; structured (default) and weight masks (the paper)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitcc
from conftest import image, tiny_vit
from vitcc.passes.dimap import distortion

HM = "heads,head_dim,mlp"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_distortion_is_share_of_energy_of_larger_weights():
    e = torch.tensor([9.0, 1.0, 4.0])  # sorted: 9, 4, 1; running sums 9, 13, 14
    assert torch.allclose(distortion(e), torch.tensor([1.0, 1 / 14, 4 / 13], dtype=torch.float64))
    assert torch.allclose(distortion(e * 100), distortion(e))  # per-layer scale does not matter


def test_structured_compile_verifies_and_keeps_the_residual():
    m = tiny_vit()
    r = vitcc.compile(m, "dimap", sparsity=0.5, example_inputs=(image(),))
    assert r.report["max_abs_error"] < 1e-4
    w = r.report["widths"]
    assert w["residual"]["after"] == w["residual"]["before"]  # patch embedding and norms are never pruned
    assert w["mlp"]["after"] < w["mlp"]["before"] and w["head_dim"]["after"] < w["head_dim"]["before"]
    fams = r.program.options["families"]
    assert fams["blocks.0.mlp.hidden"][0] == fams["blocks.1.mlp.hidden"][0] == "dimap:MLP neurons"
    assert r.report["score_source"]["residual"].endswith("(fallback: magnitude)")


def test_one_threshold_per_family_not_per_layer():
    m = tiny_vit()
    with torch.no_grad():  # block 0: a few large neurons carry the energy; block 1: flat energies
        m.blocks[0].mlp.fc1.weight[8:] *= 0.01
        m.blocks[0].mlp.fc1.bias[8:] *= 0.01
        m.blocks[0].mlp.fc2.weight[:, 8:] *= 0.01
        m.blocks[1].mlp.fc1.weight.fill_(0.05)
        m.blocks[1].mlp.fc2.weight.fill_(0.05)
    r = vitcc.compile(m, "dimap", sparsity=0.5, example_inputs=(image(),))
    k0, k1 = len(r.selection["blocks.0.mlp.hidden"]), len(r.selection["blocks.1.mlp.hidden"])
    assert k0 < k1  # the concentrated layer loses more neurons
    assert k0 + k1 == 192  # half of the family's 384 neurons, one threshold
    uniform = vitcc.compile(m, "dimap{scope=layer}", sparsity=0.5, example_inputs=(image(),))
    assert len(uniform.selection["blocks.0.mlp.hidden"]) == len(uniform.selection["blocks.1.mlp.hidden"]) == 96


def test_scores_ignore_the_scale_of_a_layer():
    m = tiny_vit()
    a = vitcc.compile(m, "dimap", sparsity=0.4, example_inputs=(image(),), verify=False)
    with torch.no_grad():
        for p in (m.blocks[0].mlp.fc1.weight, m.blocks[0].mlp.fc1.bias, m.blocks[0].mlp.fc2.weight):
            p.mul_(10.0)
    b = vitcc.compile(m, "dimap", sparsity=0.4, example_inputs=(image(),), verify=False)
    assert all(np.array_equal(a.selection[k], b.selection[k]) for k in a.selection)


def test_weight_granularity_masks_weights_and_keeps_shapes():
    m = tiny_vit()
    x = image()
    r = vitcc.compile(m, "dimap{granularity=weight}", sparsity=0.5, example_inputs=(x,))
    ws = r.report["weight_sparsity"]
    assert set(ws["per_family"]) == {"QKV", "PRJ", "MLP"}
    assert all(abs(v - 0.5) < 1e-3 for v in ws["per_family"].values())
    assert r.report["params_after"] == r.report["params_before"]  # shapes unchanged: masks only
    sd = dict(r.module.named_parameters())
    qkv = [sd[f"blocks.{i}.attn.qkv.weight"] for i in (0, 1)]
    assert abs(sum(int((w == 0).sum()) for w in qkv) / sum(w.numel() for w in qkv) - 0.5) < 1e-3  # per family
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.0.mlp.fc2.weight"):
        assert torch.equal(sd[name] == 0, ~r.program.options["weight_masks"][name])
    assert float((sd["patch_embed.proj.weight"] == 0).float().mean()) == 0.0  # never pruned
    assert r.report["max_abs_error"] < 1e-4
    # compile's fine-tuning keeps the zeros (masks re-applied after every optimizer step)
    from torch.utils.data import DataLoader, TensorDataset
    data = DataLoader(TensorDataset(image(batch=32, seed=7), torch.arange(32) % 10), batch_size=16)
    t = vitcc.compile(m, "dimap{granularity=weight}", sparsity=0.5, example_inputs=(x,), data=(data, data),
                      finetune_epochs=1, calibration_size=16)
    masks = t.program.options["weight_masks"]
    tuned = dict(t.module.named_parameters())
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])  # it trained
    for name, mask in masks.items():
        assert torch.equal(tuned[name] == 0, ~mask), name
    assert t.report["weight_sparsity"]["zeros"] == ws["zeros"]
    # the budget as a fraction of all parameters
    p = vitcc.compile(m, "dimap{granularity=weight}", sparsity=0.3, target="params", example_inputs=(x,))
    assert abs(p.report["weight_sparsity"]["of_all_parameters"] - 0.3) < 2e-3


def test_weight_masks_are_exported_to_onnx_as_zeros(tmp_path):
    import onnx
    from onnx import numpy_helper
    from vitcc.deploy.export import export_onnx
    x = image()
    r = vitcc.compile(tiny_vit(), "dimap{granularity=weight}", sparsity=0.5, example_inputs=(x,))
    res = export_onnx(r.module, (x,), tmp_path / "w.onnx")
    assert res["max_abs_error"] < 1e-4
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "w.onnx")).graph.initializer]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros >= r.report["weight_sparsity"]["zeros"]  # the masks travel as zeros in the initializers


def test_composition_with_gohsp_resolves_the_same_in_either_order():
    m = tiny_vit()
    x = image(batch=16, seed=3)
    calib = {"calibration": x}
    from vitcc import Insertion, Pass, PassResult

    class GiveCalibration(Pass):
        name = "give-calibration"

        def run(self, program):
            program.options.update(calib)
            return PassResult(modified=False)
    ins = [Insertion(GiveCalibration(), after="analyze")]
    a = vitcc.compile(m, "gohsp,dimap", sparsity=0.34, example_inputs=(x[:2],), insert=ins)
    b = vitcc.compile(m, "dimap,gohsp", sparsity=0.34, example_inputs=(x[:2],), insert=ins)
    for r in (a, b):
        src = r.report["score_source"]
        assert src["blocks.0.attn.heads"] == "gohsp"
        assert src["blocks.0.mlp.hidden"] == src["blocks.1.attn.qk_dim"] == "dimap"
    assert all(np.array_equal(a.selection[k], b.selection[k]) for k in a.selection)
    # a core pass after dimap rescores everything and cancels dimap's families: plain magnitude
    c = vitcc.compile(m, "dimap,magnitude", sparsity=0.4, example_inputs=(x[:2],))
    d = vitcc.compile(m, "magnitude", sparsity=0.4, prune=HM, example_inputs=(x[:2],))
    assert all(np.array_equal(c.selection[k], d.selection[k]) for k in d.selection)


def test_global_scope_is_one_ranking():
    m = tiny_vit()
    r = vitcc.compile(m, "dimap{scope=global}", sparsity=0.5, example_inputs=(image(),))
    fams = {f for f, _ in r.program.options["families"].values()}
    assert fams == {"dimap"}
    with pytest.raises(vitcc.VitccError, match="scope"):
        vitcc.compile(m, "dimap{scope=nope}", sparsity=0.5, example_inputs=(image(),))
