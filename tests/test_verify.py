import pytest
import torch

import vitcc
from vitcc.errors import VerificationError
from vitcc.pipeline import Insertion, Pass, PassResult

from conftest import image, tiny_vit


class Sabotage(Pass):
    """A buggy pass: changes a weight after rewrite. Verification must catch it."""
    name = "sabotage"

    def run(self, program):
        with torch.no_grad():
            program.gm.get_submodule("blocks.0.mlp.fc1").weight.mul_(1.5)
        return PassResult()


def test_a_wrong_rewrite_fails_verification():
    with pytest.raises(VerificationError, match="verification failed"):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(),),
                      insert=[Insertion(Sabotage(), after="rewrite")])


def test_report_holds_the_errors():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),))
    assert 0 <= r.report["max_abs_error"] < 1e-5 and "max_rel_error" in r.report
