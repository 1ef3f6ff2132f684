"""The masked reference: cheaper ways to its values must give its values."""
import dataclasses

import pytest
import torch
import torch.fx as fx

import vitcc
from vitcc.reference.masking import MaskedInterpreter
from vitcc.metrics import macs_counter

from conftest import image, tiny_vit

aten = torch.ops.aten


class _Everything(MaskedInterpreter):
    """Keeps every node's output."""

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.seen[n.name] = out
        return out


def _reference(program, table, x):
    interp = _Everything(program.original, program.coupling, program.keep_by_root(), table,
                         zeroed=program.removed_outputs(program.keep_by_root()))
    interp.seen = {}
    with torch.no_grad():
        interp.run(x)
    return interp.seen


@pytest.fixture(scope="module")
def program():
    return vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),)).program


def test_kept_linear_gives_the_full_product_on_zeroed_inputs(program):
    full = program.ops.copy()
    full.entries[aten.linear.default] = dataclasses.replace(program.ops.get(aten.linear.default), masked=None)
    x = image(seed=7)
    kept, every = _reference(program, program.ops, x), _reference(program, full, x)
    linears = [n.name for n in program.original.graph.nodes if n.target is aten.linear.default]
    assert linears and set(kept) == set(every)
    for name, value in every.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(kept[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_kept_linear_multiplies_what_the_compact_model_does(program):
    """The reference's GEMMs are the compact model's sizes (attention still runs every head)."""
    def gemm_macs(run):
        counter = macs_counter()
        with torch.no_grad(), counter:
            run()
        counts = counter.get_flop_counts()["Global"]
        return sum(v for k, v in counts.items() if k in (aten.addmm, aten.mm, aten.bmm)) // 2

    x = image(seed=3)
    reference = MaskedInterpreter(program.original, program.coupling, program.keep_by_root(), program.ops)
    compact = gemm_macs(lambda: program.gm(x))
    assert compact > 0 and gemm_macs(lambda: reference.run(x)) == compact
    assert gemm_macs(lambda: program.original(x)) > compact
