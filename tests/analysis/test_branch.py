"""Depth pruning: residual branches (a block's attention, its MLP) found from the graph and removed whole."""
import copy
import functools
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitcc
from vitcc.frontend.capture import capture
from vitcc.cli import run
from vitcc.errors import VitccError
from vitcc.search.cost import estimate
from vitcc.ir.program import Program
from vitcc.analysis.refresh import analyze_program
from vitcc.ir.selection import KeptByRoot, prune_kinds

from conftest import image, tiny_hf, tiny_swin, tiny_vit

VIT = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
SWIN = [f"layers.{s}.blocks.{b}.{r}" for s in (0, 1) for b in (0, 1) for r in ("attn", "mlp")]


MODELS = {"vit": lambda: (tiny_vit(init_values=1e-5), image(1)), "vit4": lambda: (tiny_vit(depth=4), image(1)),
          "swin": lambda: (tiny_swin(), image(1, 56)), **{f"hf_{k}": (lambda k=k: (tiny_hf(k), image(1)))
                                                          for k in ("vit", "swin", "beit")}}


@functools.lru_cache(maxsize=None)
def _captured(name):
    model, x = MODELS[name]()
    return model, capture(model, (x,)), x


def captured(name):
    """(model, a fresh copy of its capture, example input): compile takes a captured graph as it is, and
    capturing once keeps the file fast."""
    model, gm, x = _captured(name)
    return model, copy.deepcopy(gm), x


def branches(result):
    return [b.name for b in result.program.branches]


def module_nodes(gm, prefix):
    """Ops of `gm` called inside a module under `prefix` (nn_module_stack of the capture)."""
    out = []
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.op == "call_function" and any(str(path) == prefix or str(path).startswith(prefix + ".")
                                           for path, _ in stack.values()):
            out.append(n.name)
    return out


def params_under(module, prefix):
    return [n for n, _ in [*module.named_parameters(), *module.named_buffers()] if n.startswith(prefix + ".")]


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def check_runs_like_masked(result, model, x):
    """compile verified it; the compact model also runs at another batch size and its output has the model's shape."""
    with torch.no_grad():
        got, want = logits(result.module(x)), logits(model(x))
    assert got.shape == want.shape and torch.isfinite(got).all()


# ------------------------------------------------------------------------------------------ finding them

def test_branches_of_a_vit_are_its_attentions_and_mlps():
    _, gm, x = captured("vit")
    r = vitcc.compile(gm, example_inputs=(x,))
    assert branches(r) == VIT
    attn, mlp = r.program.branches[:2]
    assert (attn.role, mlp.role) == ("attn", "mlp")
    assert attn.groups == ("blocks.0.attn.heads", "blocks.0.attn.qk_dim", "blocks.0.attn.v_dim")
    assert mlp.groups == ("blocks.0.mlp.hidden",)
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"} <= set(attn.params)
    assert all(b.prunable for b in r.program.branches)


def test_swin_and_hf_branches_are_named_by_the_modules_holding_them():
    _, gm, x = captured("swin")
    assert branches(vitcc.compile(gm, example_inputs=(x,))) == SWIN
    _, gm, x = captured("hf_vit")
    hf = branches(vitcc.compile(gm, example_inputs=(x,)))
    assert len(hf) == 4 and hf[0].endswith(".0.attention") and hf[1].endswith(".0.mlp"), hf


def test_a_branch_output_used_outside_it_is_frozen_and_shared_ops_stay():
    class Leaky(torch.nn.Module):  # returns values of its MLP branch
        def __init__(self):
            super().__init__()
            self.embed, self.norm = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)
            self.fc1, self.fc2, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            x = self.embed(x)
            h = self.fc1(self.norm(x)).relu()
            y = self.fc2(h)
            x = x + y
            return self.head(x.mean(1)), (y if self.leak_output else h).sum(-1)

    model, x = Leaky().eval(), torch.randn(1, 5, 8)
    model.leak_output = True  # the branch's output is an output: the branch cannot go
    (b,) = vitcc.compile(model, example_inputs=(x,)).program.branches
    assert b.frozen and "outside the branch" in b.frozen
    with pytest.raises(VitccError, match="cannot be removed"):
        vitcc.compile(model, keep={b.name: []}, example_inputs=(x,))
    model.leak_output = False  # only its hidden values are: removing it removes fc2 and keeps what h needs
    (b,) = vitcc.compile(model, example_inputs=(x,)).program.branches
    assert b.prunable and b.name == "fc2" and set(b.params) == {"fc2.weight", "fc2.bias"}
    r = vitcc.compile(model, keep={"fc2": []}, example_inputs=(x,))
    assert {n for n, _ in r.module.named_parameters()} == {"embed.weight", "embed.bias", "norm.weight", "norm.bias",
                                                          "fc1.weight", "fc1.bias", "head.weight", "head.bias"}


# ------------------------------------------------------------------------------ verified removal

@pytest.mark.parametrize("remove", [["blocks.0.attn", "blocks.0.mlp"],  # every branch of a block
                                    ["blocks.1.attn", "blocks.1.mlp"],  # the last block
                                    ["blocks.0.attn", "blocks.1.attn"],  # every attention
                                    VIT])  # everything
def test_removed_branches_leave_no_op_behind(remove):
    model, gm, x = captured("vit")
    r = vitcc.compile(gm, keep={n: [] for n in remove}, example_inputs=(x,))
    assert r.report["removed_branches"] == sorted(remove) and r.report["max_abs_error"] < 1e-5
    gone = {"blocks.0.attn": ("blocks.0.norm1", "blocks.0.attn", "blocks.0.ls1"),
            "blocks.0.mlp": ("blocks.0.norm2", "blocks.0.mlp", "blocks.0.ls2"),
            "blocks.1.attn": ("blocks.1.norm1", "blocks.1.attn", "blocks.1.ls1"),
            "blocks.1.mlp": ("blocks.1.norm2", "blocks.1.mlp", "blocks.1.ls2")}
    for name in remove:
        for prefix in gone[name]:
            assert not params_under(r.module, prefix) and not module_nodes(r.module, prefix), prefix
    for name in set(VIT) - set(remove):
        assert params_under(r.module, gone[name][1])
    adds = sum(n.target is torch.ops.aten.add.Tensor for n in r.program.original.graph.nodes)
    assert sum(n.target is torch.ops.aten.add.Tensor for n in r.module.graph.nodes) == adds - len(remove)
    block = [n for n in ("blocks.0", "blocks.1") if {f"{n}.attn", f"{n}.mlp"} <= set(remove)]
    for prefix in block:  # the whole block: not even its add
        assert not module_nodes(r.module, prefix) and not params_under(r.module, prefix)
    check_runs_like_masked(r, model, image(3))


def test_branch_removal_with_narrower_widths_is_verified():
    model, gm, x = captured("vit")
    keep = {"blocks.1.attn": [], "blocks.0.mlp.hidden": list(range(0, 192, 2)), "residual": list(range(32))}
    r = vitcc.compile(gm, keep=keep, example_inputs=(x,))
    assert r.report["removed_branches"] == ["blocks.1.attn"] and r.report["max_abs_error"] < 1e-4
    assert r.module.get_parameter("blocks.0.mlp.fc1.weight").shape == (96, 32)
    check_runs_like_masked(r, model, image(2))


def test_swin_drops_the_last_blocks_of_a_stage_and_keeps_the_patch_merging():
    model, gm, x = captured("swin")
    last = ["layers.0.blocks.1.attn", "layers.0.blocks.1.mlp", "layers.1.blocks.1.attn", "layers.1.blocks.1.mlp"]
    r = vitcc.compile(gm, keep={n: [] for n in last}, example_inputs=(x,))
    assert r.report["removed_branches"] == sorted(last) and r.report["max_abs_error"] < 1e-4
    for prefix in ("layers.0.blocks.1", "layers.1.blocks.1"):  # not even the block's reshapes of the stream
        assert not params_under(r.module, prefix) and not module_nodes(r.module, prefix), prefix
    assert params_under(r.module, "layers.1.downsample") and params_under(r.module, "layers.0.blocks.0")
    check_runs_like_masked(r, model, image(2, 56))


@pytest.mark.parametrize("kind", ["vit", "swin", "beit"])
def test_hf_branches_removed_and_narrowed_are_verified(kind):
    model, gm, x = captured(f"hf_{kind}")
    first = vitcc.compile(gm, sparsity=0.25, prune="heads,mlp,branch", example_inputs=(x,))
    assert first.report["max_abs_error"] < 1e-4
    assert len(first.report["removed_branches"]) == len(first.program.branches) // 4
    names = branches(first)
    remove = [names[1], names[-2]]  # an MLP and an attention
    r = vitcc.compile(captured(f"hf_{kind}")[1], keep={n: [] for n in remove}, example_inputs=(x,))
    assert r.report["removed_branches"] == sorted(remove) and r.report["max_abs_error"] < 1e-4
    for name in remove:
        b = first.program.branch(name)
        assert not set(b.params) & {n for n, _ in r.module.named_parameters()}
    check_runs_like_masked(r, model, image(2))


def test_a_branch_that_computes_nothing_is_removed_exactly():
    """Planted zero: with blocks.1's attention projection zeroed, the model without that branch is the model."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.bias.zero_()
    r = vitcc.compile(model, keep={"blocks.1.attn": []}, example_inputs=(image(1),))
    x = image(4)
    with torch.no_grad():
        torch.testing.assert_close(logits(r.module(x)), model(x), rtol=1e-5, atol=1e-5)
    assert not module_nodes(r.module, "blocks.1.attn")


# ------------------------------------------------------------------------------------- selection

def calibration_data(n=16):
    data = TensorDataset(image(n, seed=3), torch.arange(n) % 10)
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)


def test_depth_pruning_alone_removes_the_branch_that_matters_least():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.bias.zero_()
    x = image(1)
    gm = capture(model, (x,))
    # with data: the change of the output each removal makes (zero for the planted branch)
    r = vitcc.compile(copy.deepcopy(gm), sparsity=0.25, prune="branch", data=calibration_data(), example_inputs=(x,))
    assert r.report["removed_branches"] == ["blocks.1.attn"]
    scores = {b["name"]: b["score"] for b in r.report["branches"]}
    assert scores["blocks.1.attn"] == 0 and min(v for k, v in scores.items() if k != "blocks.1.attn") > 0
    # without: what its channels score (the projection's half of its magnitude is gone)
    r = vitcc.compile(gm, sparsity=0.25, prune="branch", example_inputs=(x,))
    assert r.report["removed_branches"] == ["blocks.1.attn"] and r.report["widths"]["branch"]["after"] == 3


@pytest.mark.parametrize("target", ["params", "macs"])
@pytest.mark.parametrize("goal", [0.3, 0.5])
def test_budget_search_with_branches_meets_the_target(target, goal):
    _, gm, x = captured("vit4")
    r = vitcc.compile(gm, sparsity=goal, prune="heads,mlp,branch", target=target, example_inputs=(x,))
    removed = 1 - r.report[f"{target}_after"] / r.report[f"{target}_before"]
    assert goal <= removed + 1e-9 and removed < goal + 0.02, (removed, r.report["selection"])
    assert "branches removed" in r.report["selection"]


@pytest.mark.parametrize("data", [False, True])
def test_budget_search_removes_a_branch_that_matters_little_instead_of_narrowing(data):
    model = tiny_vit(depth=4)
    with torch.no_grad():  # blocks.2's MLP barely adds anything: removing it costs less than narrowing
        for p in model.blocks[2].mlp.parameters():
            p.mul_(1e-3)
    r = vitcc.compile(model, sparsity=0.2, prune="heads,mlp,branch", target="params", example_inputs=(image(1),),
                      data=calibration_data() if data else None)
    assert "blocks.2.mlp" in r.report["removed_branches"], r.report["selection"]
    removed = 1 - r.report["params_after"] / r.report["params_before"]
    assert 0.2 <= removed < 0.22


def test_depth_pruning_for_a_budget_removes_whole_branches_only():
    _, gm, x = captured("vit4")
    r = vitcc.compile(gm, sparsity=0.3, prune="branch", target="macs", example_inputs=(x,))
    assert r.report["removed_branches"] and not r.selection.kept
    assert 1 - r.report["macs_after"] / r.report["macs_before"] >= 0.3
    p = Program(gm=captured("vit4")[1], example_inputs=(x,))
    analyze_program(p)
    dense, removed = estimate(p, KeptByRoot())[1], set(r.report["removed_branches"])
    for name in removed:  # none of them is more than the goal needs
        assert 1 - estimate(p, KeptByRoot({}, removed - {name}))[1] / dense < 0.3
    w = r.report["widths"]
    assert w["branch"] == {"groups": 8, "before": 8, "after": 8 - len(r.report["removed_branches"])}
    with pytest.raises(VitccError, match="out of reach"):
        vitcc.compile(captured("vit4")[1], sparsity=0.99, prune="branch", target="params", example_inputs=(x,))


def test_the_kind_is_named_in_prune_and_round_trips_through_a_selection():
    assert prune_kinds("heads,branch") == {"heads", "branch"} and "branch" not in prune_kinds(None)
    with pytest.raises(VitccError, match="branch"):
        prune_kinds("blocks")
    _, gm, x = captured("vit")
    first = vitcc.compile(gm, sparsity=0.5, prune="mlp,branch", example_inputs=(x,))
    assert len(first.report["removed_branches"]) == 2
    again = vitcc.compile(captured("vit")[1], keep=first.selection.to_json(), example_inputs=(x,))
    assert again.report["removed_branches"] == first.report["removed_branches"]
    assert again.selection.to_json() == first.selection.to_json()
    with pytest.raises(VitccError, match="one unit"):
        vitcc.compile(captured("vit")[1], keep={"blocks.0.mlp": [0, 1]}, example_inputs=(x,))


# ------------------------------------------------------------------------------------- CLI

def test_cli_depth_pruning_reports_removed_branches_and_inspect_shows_them(tmp_path, capsys):
    model = "py:" + str(__import__("conftest").__file__) + ":tiny_vit"
    report, onnx, out = tmp_path / "r.json", tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert run(["compile", model, "--prune", "branch", "--sparsity", "0.5", "--report", str(report),
                "--onnx", str(onnx), "-o", str(out)]) == 0
    rep = json.loads(report.read_text())
    assert rep["onnx"]["max_abs_error"] < 1e-4 and vitcc.load(out)(image(2)).shape == (2, 10)
    assert len(rep["removed_branches"]) == 2 and set(rep["removed_branches"]) <= set(VIT)
    assert {b["name"] for b in rep["branches"] if b["removed"]} == set(rep["removed_branches"])
    assert "removed branches:" in capsys.readouterr().out
    assert run(["inspect", model, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in shown["branches"]] == VIT and shown["branches"][0]["role"] == "attn"
    assert run(["inspect", model]) == 0
    out = capsys.readouterr().out
    assert "residual branches" in out and "blocks.1.mlp" in out and "removable" in out
