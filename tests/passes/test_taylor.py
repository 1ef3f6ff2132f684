"""taylor: first-order Taylor scores from calibration data, and compile with data end to end."""
import pytest
import torch
import torch.nn.functional as F

import vitcc
from vitcc.training.data import make_loaders
from vitcc.errors import VitccError
from vitcc.pipeline.manager import make_pass

from conftest import analyzed, tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


X = (torch.randn(1, 3, 8, 8),)


def small_vit():
    return tiny_vit(img_size=8, patch_size=4)


@pytest.mark.parametrize("reduce", ["abs", "group"])
def test_scores_one_per_index_and_match_a_hand_computation(reduce):
    model = small_vit()
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    p = analyzed(model, X[0], calibration=x, calibration_labels=y)
    make_pass("taylor", {"batch": 8, "reduce": reduce}).run(p)
    for g in p.groups:
        s = p.scores[g.name]
        assert s.shape == (g.size,) and torch.isfinite(s).all() and (s >= 0).all()
    assert all(p.scores[g.name].sum() > 0 for g in p.groups if g.frozen is None)
    loss = F.cross_entropy(model(x), y)
    fc1, fc2 = model.blocks[1].mlp.fc1, model.blocks[1].mlp.fc2
    g1w, g1b, g2w = torch.autograd.grad(loss, [fc1.weight, fc1.bias, fc2.weight])
    if reduce == "abs":  # sum |w * g| over the neuron's fc1 row, bias and fc2 column
        want = (fc1.weight * g1w).abs().sum(1) + (fc1.bias * g1b).abs() + (fc2.weight * g2w).abs().sum(0)
    else:  # |sum w * g|
        want = ((fc1.weight * g1w).sum(1) + fc1.bias * g1b + (fc2.weight * g2w).sum(0)).abs()
    torch.testing.assert_close(p.scores["blocks.1.mlp.hidden"], want.detach(), rtol=1e-4, atol=1e-7)
    assert all(q.grad is None for q in p.gm.parameters())


def test_predictions_as_targets_without_labels():
    p = analyzed(small_vit(), X[0], calibration=torch.randn(6, 3, 8, 8))
    make_pass("taylor", {"batch": 4}).run(p)
    assert p.scores["blocks.0.attn.heads"].shape == (3,)


def test_no_data_is_a_clear_error():
    with pytest.raises(VitccError, match="needs calibration data: pass --data"):
        vitcc.compile(small_vit(), "taylor", sparsity=0.5, example_inputs=X)


def test_compile_with_taylor_is_verified_and_reports_accuracy():
    train, val = make_loaders("digits", (3, 8, 8), batch_size=64, mean=0.5, std=0.5)
    r = vitcc.compile(small_vit(), "taylor", sparsity=0.5, example_inputs=X, data=(train, val), calibration_size=32)
    assert r.report["max_abs_error"] < 1e-4
    assert r.program.options["calibration"].shape == (32, 3, 8, 8)
    assert r.report["params_after"] < r.report["params_before"]
    for key in ("accuracy_before", "accuracy_after"):
        assert set(r.report[key]) == {"top1", "top5", "n"} and r.report[key]["n"] == len(val.dataset)
    assert "finetune" not in r.report
