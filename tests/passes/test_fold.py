
import vitcc

from conftest import image, tiny_vit


def test_mlp_with_no_neurons_folds_to_fc2_bias():
    model = tiny_vit()
    r = vitcc.compile(model, "magnitude", keep={"blocks.0.mlp.hidden": []}, example_inputs=(image(),))
    names = [n for n, _ in r.module.named_parameters()]
    assert not any(n.startswith(("blocks.0.mlp.fc1.", "blocks.0.mlp.fc2.weight")) for n in names)
    fold = next(p for p in r.report["passes"] if p["name"] == "fold")
    assert fold["modified"]
    assert r.report["max_abs_error"] < 1e-5


def test_nothing_to_fold_leaves_the_graph_alone():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(),))
    assert not next(p for p in r.report["passes"] if p["name"] == "fold")["modified"]
