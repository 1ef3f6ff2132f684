import torch

import vitcc
from conftest import image, tiny_vit


def test_kept_indices_may_be_a_range_a_list_or_a_tensor():
    """A user's `keep=` may come from a scoring of their own: a tensor of indices (on any device) keeps what a
    list of the same ints keeps."""
    model, x = tiny_vit(), image()
    kept = torch.tensor([0, 5, 7, 40, 41, 90])
    by_tensor = vitcc.compile(model, "magnitude", example_inputs=(x,), keep={"blocks.0.mlp.hidden": kept})
    by_list = vitcc.compile(model, "magnitude", example_inputs=(x,), keep={"blocks.0.mlp.hidden": kept.tolist()})
    assert by_tensor.report["max_abs_error"] < 1e-4 and by_list.report["max_abs_error"] < 1e-4
    assert by_tensor.report["widths"] == by_list.report["widths"]
    assert torch.equal(by_tensor.module(x), by_list.module(x))
