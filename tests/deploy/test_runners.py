"""vitcc.deploy.runners through `vitcc bench`: the modes and dtypes a device runs, refused in one line where it
cannot; torch.compile on the CPU; eager and CUDA graphs on a GPU (skipped without one)."""
import json

import pytest
import torch

from vitcc.cli import run

from conftest import tiny_vit

SHAPE = ["--input-shape", "1,3,32,32"]
QUICK = ["--rounds", "2", "--warmup", "1", "--threads", "1"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_bench_cudagraph_mode_is_refused_on_the_cpu(model_file, capsys, tmp_path):
    assert run(["bench", str(model_file), "--mode", "cudagraph", "--json", str(tmp_path / "b.json"), *SHAPE]) == 2
    assert "--mode cudagraph replays a CUDA graph and needs --device cuda" in one_error_line(capsys)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--mode", "turbo"], "bad --mode 'turbo'"),
    (["--dtype", "fp8"], "bad --dtype 'fp8'"),
    (["--dtype", "fp16"], "--dtype fp16 runs on a GPU"),
    (["--dtype", "bf16", "--runtime", "onnx"], "--runtime onnx runs onnxruntime on the CPU in float32"),
    (["--mode", "compile", "--compile-mode", "fastest"], "bad --compile-mode 'fastest'"),
])
def test_bench_bad_modes_are_one_line(model_file, capsys, args, message):
    assert run(["bench", str(model_file), *args, *SHAPE]) == 2
    assert message in one_error_line(capsys)


def test_bench_eager_bf16_on_the_cpu(model_file, capsys, tmp_path):
    out = tmp_path / "b.json"
    assert run(["bench", str(model_file), "--sparsity", "0.5", "--dtype", "bf16", "--json", str(out), *QUICK,
                *SHAPE]) == 0
    data = json.loads(out.read_text())
    assert data["dtype"] == "bf16" and data["device"] == "cpu" and data["clock"] == "wall"
    assert [r["runtime"] for r in data["runs"]] == ["eager"]  # onnx runs float32: not a default here
    assert "in bf16" in capsys.readouterr().out


def test_bench_compile_mode_on_the_cpu(tmp_path, capsys):
    torch.save(tiny_vit(embed_dim=32, depth=1, num_heads=2), tmp_path / "m.pt")
    out = tmp_path / "b.json"
    assert run(["bench", str(tmp_path / "m.pt"), "--sparsity", "0.5", "--mode", "eager,compile", "--runtime", "eager",
                "--json", str(out), "--rounds", "2", "--warmup", "1", "--threads", "1", *SHAPE]) == 0
    data = json.loads(out.read_text())
    assert [r["runtime"] for r in data["runs"]] == ["eager", "compile"]
    for r in data["runs"]:
        c = r["compare"]["compiled"]
        assert r["stats"]["compiled"]["wall"] > 0 and c["efficiency"] == pytest.approx(c["speedup"] / c["ideal"])
    assert "compile batch 1" in capsys.readouterr().out


@pytest.mark.cuda
def test_cli_compile_and_bench_on_cuda(tmp_path, model_file, capsys):
    small = tmp_path / "small.pt2"
    assert run(["compile", str(model_file), "--device", "cuda", "--sparsity", "0.5", "--align", "8", "-o", str(small),
                *SHAPE]) == 0
    out = tmp_path / "b.json"
    assert run(["bench", str(model_file), str(small), "--device", "cuda", "--mode", "eager,cudagraph",
                "--dtype", "bf16", "--batch", "1,4", "--json", str(out), "--rounds", "3", "--warmup", "1",
                *SHAPE]) == 0
    data = json.loads(out.read_text())
    assert data["clock"] == "cuda events" and data["device"].startswith("cuda")
    assert {(r["runtime"], r["batch"]) for r in data["runs"]} == {("eager", 1), ("eager", 4), ("cudagraph", 1),
                                                                  ("cudagraph", 4)}
    assert all(r["stats"]["compiled"]["wall"] > 0 for r in data["runs"])
