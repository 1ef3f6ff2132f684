"""Hugging Face transformers models (tiny configs, random weights): compiled from the CLI with every kind pruned,
the compact program returns the model's own output class, planted zeros give back the original, golden groups."""
import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vitcc
from vitcc.cli import app

from conftest import HF_KINDS, image, one_training_step, tiny_hf

pytest.importorskip("transformers")
GOLDEN = Path(__file__).parents[1] / "data" / "hf_vit_groups.json"
ALL_KINDS = ("residual", "heads", "head_dim", "mlp")


def compile_cli(args, tmp_path):
    rep = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["compile", *args, "--report", str(rep)])
    assert result.exit_code == 0, result.output
    return json.loads(rep.read_text())


def assert_all_kinds_shrank(report):
    widths = report["widths"]
    for kind in ALL_KINDS:
        assert widths[kind]["after"] < widths[kind]["before"], (kind, widths)
    assert not report["frozen"]
    assert report["max_rel_error"] < 1e-4


@pytest.mark.parametrize("kind", HF_KINDS)
def test_cli_compiles_every_hf_kind_with_all_kinds_pruned(hf_vit_dir, kind, tmp_path):
    """`--align 1`: the tiny head dims (12) would round back to 16 at the CLI's default alignment."""
    out = tmp_path / "small.pt2"
    report = compile_cli([f"hf:{hf_vit_dir(kind)}", "--sparsity", "0.3", "--align", "1", "-o", str(out)], tmp_path)
    assert_all_kinds_shrank(report)
    small, ref = vitcc.load(out), tiny_hf(kind)
    x = image(3)
    with torch.no_grad():
        got, want = small(x), ref(x)
    assert type(got) is type(want)  # ImageClassifierOutput, DeiTForImageClassificationWithTeacherOutput, ...
    assert got.logits.shape == want.logits.shape == (3, 10)
    assert report["params_after"] < report["params_before"]


def test_compile_returns_the_models_output_class_and_it_survives_pt2(compact_deit):
    model, r, saved = compact_deit
    assert_all_kinds_shrank(r.report)
    x = image(4)
    with torch.no_grad():
        got, want = r.module(x), model(x)
    assert type(got).__name__ == "DeiTForImageClassificationWithTeacherOutput" and type(got) is type(want)
    assert set(got.keys()) == set(want.keys()) == {"logits", "cls_logits", "distillation_logits"}
    torch.testing.assert_close(got.logits, (got.cls_logits + got.distillation_logits) / 2)
    loaded = vitcc.load(saved)
    with torch.no_grad():
        again = loaded(x)
    assert type(again) is type(want)
    for k in want.keys():
        torch.testing.assert_close(again[k], got[k], rtol=1e-5, atol=1e-6)


def test_a_compact_hf_model_fine_tunes_one_step(compact_deit, one_thread):
    small = copy.deepcopy(compact_deit[1].module)  # the shared fixture stays untouched
    one_training_step(small, image(8), torch.arange(8) % 10, logits=lambda out: out.logits)


def plant(model, H=4, D=12, C=48):
    """Zero head 1 of layer 0 (q, k, v rows), v dims 3 and 7 and qk dims 2 and 9 of layer 1, MLP neurons 5, 17
    and 60 of layer 0 (fc1 rows): removing exactly those leaves the function unchanged."""
    at0, at1 = model.vit.layers[0].attention, model.vit.layers[1].attention
    with torch.no_grad():
        for proj in (at0.q_proj, at0.k_proj, at0.v_proj):
            proj.weight[D:2 * D] = 0
            proj.bias[D:2 * D] = 0
        for h in range(H):
            for proj, dims in ((at1.v_proj, (3, 7)), (at1.q_proj, (2, 9)), (at1.k_proj, (2, 9))):
                rows = [h * D + d for d in dims]
                proj.weight[rows] = 0
                proj.bias[rows] = 0
        fc1 = model.vit.layers[0].mlp.fc1
        fc1.weight[[5, 17, 60]] = 0
        fc1.bias[[5, 17, 60]] = 0


def test_planted_zeros_give_back_the_original_hf_vit():
    model = tiny_hf("vit")
    plant(model)
    x = image(2)
    with torch.no_grad():
        want = model(x).logits
    keep = {"vit.layers.0.attention.heads": [0, 2, 3],
            "vit.layers.1.attention.v_dim": [d for d in range(12) if d not in (3, 7)],
            "vit.layers.1.attention.qk_dim": [d for d in range(12) if d not in (2, 9)],
            "vit.layers.0.mlp.hidden": [j for j in range(96) if j not in (5, 17, 60)]}
    r = vitcc.compile(model, keep=keep, example_inputs=(image(1),))
    with torch.no_grad():
        got = r.module(x)
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-5)
    assert r.module.get_submodule("vit.layers.0.attention.q_proj").weight.shape == (36, 48)
    assert r.module.get_submodule("vit.layers.1.attention.v_proj").weight.shape == (40, 48)
    assert r.module.get_submodule("vit.layers.1.attention.k_proj").weight.shape == (40, 48)
    assert r.module.get_submodule("vit.layers.0.mlp.fc1").weight.shape == (93, 48)


def test_hf_vit_groups_match_golden(hf_vit_dir):
    """The analysis of an HF ViT must not drift silently (regenerate with `vitcc inspect hf:DIR --json`)."""
    result = CliRunner().invoke(app, ["inspect", f"hf:{hf_vit_dir('vit')}", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got == json.loads(GOLDEN.read_text())
    kinds = [g["kind"] for g in got["groups"]]
    assert kinds.count("heads") == 2 and kinds.count("head_dim") == 4 and kinds.count("mlp") == 2
    assert kinds.count("residual") == 1 and not got["frozen"]
    assert [b["name"] for b in got["branches"]] == [f"vit.layers.{i}.{r}" for i in (0, 1) for r in ("attention", "mlp")]
