"""The command line as a user meets it: outputs, reports, exit codes and one-line errors."""
import json
import os
import pickle

import pytest
import torch

import vitcc
from vitcc.cli import run
import vitcc.pipeline as pipeline
from vitcc.pipeline import Pass, PassResult, register_pass

from conftest import tiny_vit

SHAPE = ["--input-shape", "1,3,32,32"]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_vit(), path)
    return path


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("vitcc: error:")
    return err


def test_compile_writes_model_onnx_and_report(tmp_path, model_file, capsys):
    out, onnx, rep = tmp_path / "small.pt", tmp_path / "small.onnx", tmp_path / "report.json"
    code = run(["compile", str(model_file), "--passes", "magnitude{p=1}", "--sparsity", "0.5", "-o", str(out),
                "--onnx", str(onnx), "--report", str(rep), *SHAPE])
    assert code == 0
    shown = capsys.readouterr().out
    assert "parameters" in shown and "MACs" in shown and "verified" in shown and "rewrite" in shown
    report = json.loads(rep.read_text())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "max_abs_error", "groups", "frozen",
                "passes"):
        assert key in report
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    g = next(g for g in report["groups"] if g["name"] == "blocks.0.mlp.hidden")
    assert g["kind"] == "mlp" and g["size"] == 192 and len(g["kept"]) == 96
    assert all({"name", "seconds"} <= set(p) for p in report["passes"])
    assert report["onnx"]["checker"] == "ok" and onnx.exists()
    small = vitcc.load(out)
    x = torch.randn(1, 3, 32, 32)
    assert small(x).shape == (1, 10)
    assert torch.load(out, weights_only=False)(x).shape == (1, 10)


def test_inspect_lists_groups_as_json(model_file, capsys):
    assert run(["inspect", str(model_file), "--json", *SHAPE]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {g["kind"] for g in data["groups"]} == {"residual", "heads", "head_dim", "mlp"}
    assert all({"name", "kind", "size", "members"} <= set(g) for g in data["groups"])


@pytest.mark.parametrize("args, message", [
    (["compile", "nope.pt"], "no such file"),
    (["compile", "MODEL", "--passes", "bogus"], "unknown pass 'bogus'"),
    (["compile", "MODEL", "--sparsity", "1.5"], "sparsity must be in"),
    (["compile", "MODEL", "--prune", "tokens"], "unknown group kind"),
    (["compile", "MODEL", "--input-shape", "a,b"], "input"),
    (["compile", "timm:not_a_model"], "not_a_model"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, model_file, capsys, args, message):
    out = tmp_path / "o.pt"
    args = [str(model_file) if a == "MODEL" else a for a in args]
    assert run(args + ["-o", str(out)]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    assert run(["compile", str(bad)]) == 2
    assert "cannot read" in error_line(capsys)


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    Hostile.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"model": Hostile()}, evil)
    assert run(["compile", str(evil), "-o", str(tmp_path / "o.pt")]) == 2
    err = error_line(capsys)
    assert "--trust-pickle" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def test_never_overwrites_the_input(model_file, capsys):
    before = model_file.read_bytes()
    assert run(["compile", str(model_file), "-o", str(model_file), *SHAPE]) == 2
    assert "overwrite" in error_line(capsys)
    assert model_file.read_bytes() == before


def test_failed_verification_exits_3_and_writes_nothing(tmp_path, model_file, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "_DECLARED", dict(pipeline._DECLARED))  # the pass is declared for this test only

    @register_pass("test-corrupt")
    class Corrupt(Pass):
        def run(self, program):  # a buggy method pass that edits weights of the graph being compiled
            with torch.no_grad():
                program.gm.get_submodule("blocks.0.mlp.fc1").weight.mul_(1.5)
            return PassResult()

    out, rep = tmp_path / "o.pt", tmp_path / "r.json"
    code = run(["compile", str(model_file), "--passes", "magnitude,test-corrupt", "-o", str(out),
                "--report", str(rep), *SHAPE])
    assert code == 3
    assert "verification failed" in error_line(capsys)
    assert not out.exists() and not rep.exists()


def test_state_dict_with_arch(tmp_path, capsys):
    from safetensors.torch import save_file
    import timm
    sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    assert run(["inspect", str(path), "--arch", "timm:deit_tiny_patch16_224", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["groups"]) == 49
