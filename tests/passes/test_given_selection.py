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


def test_a_given_selection_leaves_the_weights_shared_until_a_pass_writes_them():
    """It writes the selection only (`writes_weights = False`): before it, the manager need not copy every weight
    of the model, which a latency table's ~40 grid points would each pay for (ViT-B on a CPU: two thirds of a
    point's narrowing)."""
    from vitcc.pipeline.pass_base import Pass, PassResult

    class SharedAfterSelect(Pass):
        name = "test-shared-after-select"
        writes_weights = False

        def run(self, program):
            self.shared = len(program.shared)
            return PassResult()

    model, x = tiny_vit(), image()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = SharedAfterSelect()
    r = vitcc.compile(model, "magnitude", example_inputs=(x,), keep={"blocks.0.mlp.hidden": range(8)},
                      insert=[vitcc.Insertion(probe, after="select")])
    assert probe.shared > 0 and r.report["max_abs_error"] < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
