"""Mutation tests: break a rewrite on purpose and verify must fail, also behind a zero classifier.

A zero-initialised head (torchvision's ViT as built, timm's hiera) makes the outputs zero on both sides,
so only the internal comparisons (residual stream, branch outputs) can catch these. Every mutation is
test-only code: a pass inserted after rewrite that edits the compact program, or a monkeypatch of the
masked reference; each one also asserts that it changed something, so no test passes vacuously.
"""
import dataclasses
import operator

import pytest
import torch
from torch import nn

import vitcc
import vitcc.reference.masking
from vitcc.errors import VerificationError
from vitcc.pipeline.manager import Insertion
from vitcc.pipeline.pass_base import Pass, PassResult
from vitcc.ir.spaces import axis_kept, normalize

from conftest import image, tiny_vit

CLASSIFIERS = ("random", "zero")


def model(classifier: str, **kw) -> nn.Module:
    m = tiny_vit(**kw)
    if classifier == "zero":
        with torch.no_grad():
            m.head.weight.zero_()
            m.head.bias.zero_()
    return m


class Mutation(Pass):
    """Applies `edit(program) -> number of things changed` to the compact program after rewrite."""
    name = "mutation"

    def __init__(self, edit):
        super().__init__()
        self.edit, self.applied = edit, 0

    def run(self, program):
        self.applied = self.edit(program)
        program.gm.recompile()
        return PassResult()


def compile_mutated(classifier: str, edit, **kw) -> Mutation:
    """Compile with `edit` after rewrite; verify must refuse it. Returns the mutation for its count."""
    m = model(classifier, **kw)
    mutation = Mutation(edit)
    with pytest.raises(VerificationError, match="verification failed") as e:
        vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(image(),),
                      insert=[Insertion(mutation, after="rewrite")])
    assert mutation.applied > 0, "the mutation found nothing to break"
    if classifier == "zero":
        assert not str(e.value).startswith("verification failed: output"), "an internal tensor must catch it"
    return mutation


def _tensor(gm, name: str) -> torch.Tensor:
    mod, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(mod), attr)


def _set_tensor(gm, name: str, value: torch.Tensor) -> None:
    mod, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(mod), attr, nn.Parameter(value.detach().clone()))


def _kept(program, name: str, axis: int) -> torch.Tensor:
    ax = program.coupling.params[name][axis]
    return torch.as_tensor(axis_kept(normalize(ax), program.keep_by_root()), dtype=torch.long)


def _reslice(program, name: str, **positions: torch.Tensor) -> None:
    """Slice the original tensor again, with `axisN=` positions instead of the kept ones on those axes."""
    t = _tensor(program.original, name)
    for axis in range(t.dim()):
        t = t.index_select(axis, positions.get(f"axis{axis}", _kept(program, name, axis)))
    _set_tensor(program.gm, name, t)


# (1) drop the pinned attention scale ----------------------------------------------------------------

def drop_sdpa_scale(program) -> int:
    """The compact SDPA falls back to its default scale, 1/sqrt(pruned head dim)."""
    n = 0
    for node in program.gm.graph.nodes:
        if "scaled_dot_product_attention" in str(node.target) and "scale" in node.kwargs:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "scale"}
            n += 1
    return n


def rescale_baked_constant(program) -> int:
    """Unfused attention multiplies q by a baked 1/sqrt(head dim); recompute it from the pruned width."""
    original, pruned = 16 ** -0.5, (len(program.keep["blocks.0.attn.qk_dim"])) ** -0.5
    n = 0
    for node in program.gm.graph.nodes:
        if (node.target is operator.mul or "aten.mul" in str(node.target)) and original in node.args:
            node.args = tuple(pruned if a == original else a for a in node.args)
            n += 1
    return n


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_dropped_sdpa_scale_fails(classifier):
    compile_mutated(classifier, drop_sdpa_scale, fused=True)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_rescaled_baked_scale_fails(classifier):
    compile_mutated(classifier, rescale_baked_constant, fused=False)


# (2) shift a head's slice by one --------------------------------------------------------------------

def shift_first_q_head(program) -> int:
    """Slice block 0's qkv rows with the first kept q head's rows one position off."""
    name, head_dim = "blocks.0.attn.qkv.weight", 16
    idx = _kept(program, name, 0)
    first = idx // head_dim == idx[0] // head_dim
    shifted = torch.where(first, idx + 1, idx)
    _reslice(program, name, axis0=shifted)
    return int(first.sum())


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_shifted_head_slice_fails(classifier):
    compile_mutated(classifier, shift_first_q_head)


# (3) skip a norm's kept-channel statistics ----------------------------------------------------------

@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_norm_over_all_channels_fails(classifier, monkeypatch):
    """The masked reference normalizes over every channel (zeros included) instead of the kept ones."""
    calls = []

    def full_statistics(interp, node, args, kwargs):
        calls.append(node.name)
        return None  # no masked semantics: the op runs over zeroed channels with the full divisor

    table = vitcc.default_table()
    norm = torch.ops.aten.layer_norm
    table.entries[norm] = dataclasses.replace(table.entries[norm], masked=full_statistics)
    monkeypatch.setattr(vitcc.api, "default_table", table.copy)
    compile_mutated(classifier, lambda program: 1)
    assert calls, "no norm was evaluated by the reference"


# (4) slice a weight wrong: not as its bias, or not as its input ------------------------------------

def first_positions(name: str, axis: int):
    """The weight `name` sliced with its first positions on `axis` instead of the kept ones: the right shape,
    the wrong neurons (fc1's rows: its bias holds the kept ones; fc2's columns: the reference reads the kept
    ones of the original weight)."""
    def edit(program) -> int:
        kept = _kept(program, name, axis)
        assert not torch.equal(kept, torch.arange(len(kept))), "kept neurons are a prefix: nothing to break"
        _reslice(program, name, **{f"axis{axis}": torch.arange(len(kept))})
        return 1
    edit.__name__ = f"first_positions_of_{name}_{axis}"
    return edit


def unsliced_fc1_weight(program) -> int:
    """fc1's bias is sliced, its weight left whole: the compact model no longer runs."""
    name = "blocks.0.mlp.fc1.weight"
    _set_tensor(program.gm, name, _tensor(program.original, name))
    return 1


@pytest.mark.parametrize("classifier", CLASSIFIERS)
@pytest.mark.parametrize("edit", [first_positions("blocks.0.mlp.fc1.weight", 0), unsliced_fc1_weight,
                                  first_positions("blocks.0.mlp.fc2.weight", 1)], ids=["fc1 rows", "fc1 whole", "fc2 columns"])
def test_a_weight_sliced_wrong_fails(classifier, edit):
    compile_mutated(classifier, edit)


def test_unmutated_zero_classifier_verifies_on_internal_tensors():
    """The control: the same model compiles, its output check is vacuous and the stream is not."""
    r = vitcc.compile(model("zero"), "magnitude", sparsity=0.5, example_inputs=(image(),))
    v = r.report["verify"]
    assert v["vacuous"] == ["output"]
    assert len(v["tensors"]) > 1 and v["worst"] != "output"
