import dataclasses

import pytest
import torch
from torch import nn

import vitcc
from vitcc.errors import VerificationError
from vitcc.pipeline.manager import Insertion
from vitcc.pipeline.pass_base import Pass, PassResult
from vitcc.reference.verification import compared_nodes, tensor_leaves
from vitcc.analysis.branches import is_add

from conftest import image, tiny_swin, tiny_vit


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


# --- internal tensors, vacuous checks, pytree outputs -------------------------------------------------


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    features: torch.Tensor


class Wrapped(nn.Module):
    """A timm ViT whose forward returns a dict, a dataclass or a nested tuple instead of a tensor."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.m = kind, tiny_vit()

    def forward(self, x):
        f = self.m.forward_features(x)
        logits = self.m.forward_head(f)
        if self.kind == "dict":
            return {"logits": logits, "features": f}
        if self.kind == "dataclass":
            return Out(logits, f)
        return logits, [f, f[:, 0]]


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple"])
def test_structured_outputs_verify_every_leaf(kind):
    r = vitcc.compile(Wrapped(kind).eval(), "magnitude", sparsity=0.5, example_inputs=(image(),))
    names = {t["name"] for t in r.report["verify"]["tensors"]}
    leaves = {"dict": {"output['logits']", "output['features']"},
              "dataclass": {"output.logits", "output.features"},
              "tuple": {"output[0]", "output[1][0]", "output[1][1]"}}[kind]
    assert leaves <= names and not r.report["verify"]["vacuous"]


def test_tensor_leaves_name_every_path():
    t = torch.zeros(1)
    got = [name for name, _ in tensor_leaves({"a": (t, [t]), "b": Out(t, t), "c": 3})]
    assert got == ["output['a'][0]", "output['a'][1][0]", "output['b'].logits", "output['b'].features"]


def test_report_lists_every_tensor_and_the_worst():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),))
    v = r.report["verify"]
    assert all(set(t) == {"name", "node", "max_abs_error", "max_rel_error", "scale"} for t in v["tensors"])
    worst = max(v["tensors"], key=lambda t: t["max_rel_error"])
    assert v["worst"] == worst["name"] == v["tensors"][0]["name"] and v["vacuous"] == []
    assert r.report["max_abs_error"] == max(t["max_abs_error"] for t in v["tensors"])
    rel = [t["max_rel_error"] for t in v["tensors"]]
    assert rel == sorted(rel, reverse=True)  # worst first


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_tensors_are_named_by_block_and_role(name):
    """Not graph nodes (add_3, dropout_12): each branch's output, the stream between and after a block's
    branches, the stream into each block; the node stays beside it."""
    model, size = (tiny_vit(), 32) if name == "vit" else (tiny_swin(), 56)
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(torch.randn(1, 3, size, size),))
    labels = {t["node"]: t["name"] for t in r.report["verify"]["tensors"]}
    assert len(set(labels.values())) == len(labels)
    blocks = [b["name"] for b in r.report["blocks"]]
    for block in blocks:
        attn, mlp = (next(b for b in r.program.branches if b.name == f"{block}.{role}") for role in ("attn", "mlp"))
        assert labels[attn.output] == f"{block}.attn output" and labels[mlp.output] == f"{block}.mlp output"
        assert labels[attn.add] == f"{block} residual after attn" and labels[mlp.add] == f"{block} residual"
        assert labels[attn.skip] in (f"{block} input", f"{blocks[blocks.index(block) - 1]} residual")
        assert labels[mlp.skip] in (f"{block} residual after attn", f"{block} residual before mlp")
    if name == "vit":
        assert sorted(labels.values()) == sorted(
            ["stem: cat", "stem: add", "blocks.0 input", "output"]
            + [f"blocks.{i}{what}" for i in (0, 1) for what in (".attn output", " residual after attn", ".mlp output",
                                                                " residual")])
    else:  # the stream into stage 2 is its patch merging's output
        assert labels[r.program.branches[4].skip] == "layers.1.blocks.0 input"
        assert not any(n.startswith(("add", "reshape", "alias", "dropout")) for n in labels.values())


def test_no_worst_tensor_when_every_error_is_zero(tmp_path, capsys):
    """Nothing removed: the compact model computes exactly what the original does, and no tensor is worst."""
    from vitcc.report import write
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.0, example_inputs=(image(),))
    v = r.report["verify"]
    assert r.report["max_abs_error"] == 0 and all(t["max_abs_error"] == 0 for t in v["tensors"])
    assert v["worst"] is None and v["tensors"]
    write(r.report, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    assert "every one of them matched exactly (error 0)" in text and "worst tensor" not in text
    assert 'class="worst"' not in text and "<td>worst</td>" not in text


def test_compared_nodes_are_the_residual_adds_and_their_inputs():
    """Chosen from the graph: 1 position-embedding add + 2 adds per block, each with its two inputs."""
    r = vitcc.compile(tiny_vit(depth=2), "magnitude", sparsity=0.5, example_inputs=(image(),))
    nodes = {n.name: n for n in r.program.original.graph.nodes}
    chosen = compared_nodes(r.program)
    adds = [n for n in chosen if is_add(nodes[n])]
    assert len(adds) == 5
    inputs = {a.name for n in adds for a in nodes[n].all_input_nodes if a.op != "get_attr"}
    assert set(chosen) == set(adds) | inputs
    compact = {n.name: n for n in r.program.gm.graph.nodes}  # rewrite, fold and dce keep node names
    assert all(compact[n].target == nodes[n].target for n in chosen)


def test_is_add_finds_the_additions_of_an_aten_graph():
    class Add(nn.Module):
        def forward(self, a, b):
            a = a * b
            a += b
            return a + b

    x = torch.randn(2, 3)
    gm = torch.export.export(Add(), (x, x)).graph_module
    adds = [n for n in gm.graph.nodes if is_add(n)]
    assert len(adds) == 2 and all(n.target.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) for n in adds)


def test_zero_classifier_of_torchvision_vit_is_checked_inside():
    """torchvision's ViT zero-initialises its head: the output check is vacuous, the stream decides."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10).eval()
    r = vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(image(),))
    v = r.report["verify"]
    assert v["vacuous"] == ["output"] and len(v["tensors"]) > 4


class IgnoresInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(torch.ones_like(x)))


def test_a_check_that_ignores_the_input_is_vacuous_and_refused_when_alone():
    with pytest.raises(VerificationError, match="vacuous"):
        vitcc.compile(IgnoresInput(), "magnitude", sparsity=0.5, example_inputs=(torch.randn(2, 4),))


def test_non_finite_weights_at_removed_positions_are_zero_in_the_reference():
    # the reference leaves a linear's weight unzeroed only where that cannot change a product (finite weights)
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[-1] = float("nan")
        model.blocks[0].mlp.fc2.weight[:, -1] = float("inf")
    r = vitcc.compile(model, "magnitude", example_inputs=(image(),), keep={"blocks.0.mlp.hidden": range(96)})
    assert r.report["max_abs_error"] < 1e-4 and r.report["widths"]["mlp"]["after"] == 96 + 192
