"""`vitcc bench` and `vitcc profile` on a tiny model: tables, JSON and errors (no timing assertions)."""
import json

import pytest
import torch

from vitcc.cli import run
from vitcc.deploy.timing import heap_policy, subnormal_policy


SHAPE = ["--input-shape", "1,3,32,32"]
QUICK = ["--rounds", "2", "--warmup", "1", "--threads", "1"]


def test_bench_compiles_and_prints_a_table(tmp_path, model_file, capsys):
    out = tmp_path / "bench.json"
    code = run(["bench", str(model_file), "--sparsity", "0.5", "--batch", "1,2", "--json", str(out), *QUICK, *SHAPE])
    assert code == 0
    shown = capsys.readouterr().out
    for text in ("parameters", "MACs", "eager batch 1", "eager batch 2", "onnx batch 1", "onnx batch 2",
                 "speed-up", "ideal", "efficiency", "model", "compiled"):
        assert text in shown, text
    data = json.loads(out.read_text())
    assert data["sizes"]["compiled"]["macs"] < data["sizes"]["model"]["macs"]
    assert {(r["runtime"], r["batch"]) for r in data["runs"]} == {("eager", 1), ("eager", 2), ("onnx", 1), ("onnx", 2)}
    for r in data["runs"]:
        c = r["compare"]["compiled"]
        assert c["ideal"] == pytest.approx(data["sizes"]["model"]["macs"] / data["sizes"]["compiled"]["macs"])
        assert c["efficiency"] == pytest.approx(c["speedup"] / c["ideal"])
        assert r["stats"]["model"]["n"] == 2 and r["stats"]["compiled"]["wall"] > 0
    assert data["threads"] == 1 and data["machine"]["threads"] == 1 and "loadavg_start" in data
    assert data["machine"]["allocator"] == heap_policy() and heap_policy() in shown.replace("\n", " ")
    assert data["machine"]["subnormals"] == subnormal_policy() and subnormal_policy() in " ".join(shown.split())


def test_bench_model_and_compiled_file(tmp_path, model_file, capsys):
    small = tmp_path / "small.pt2"
    assert run(["compile", str(model_file), "--sparsity", "0.5", "--align", "8", "-o", str(small), *SHAPE]) == 0
    capsys.readouterr()
    assert run(["bench", str(model_file), str(small), "--trust-pickle", "--runtime", "eager", *QUICK, *SHAPE]) == 0
    shown = capsys.readouterr().out
    assert "eager batch 1" in shown and "onnx" not in shown.split("┃", 1)[1] and "efficiency" in shown


def test_bench_model_alone(model_file, capsys):
    assert run(["bench", str(model_file), "--runtime", "eager", *QUICK, *SHAPE]) == 0
    shown = capsys.readouterr().out
    assert "eager batch 1" in shown and "efficiency" not in shown


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch"),
    (["--batch", "a,b"], "--batch"),
    (["--runtime", "tensorrt"], "--runtime"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "two"], "--threads"),
])
def test_bench_bad_arguments_exit_2(model_file, capsys, args, message):
    assert run(["bench", str(model_file), *args, *SHAPE]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err


@pytest.mark.parametrize("command, args, message", [
    ("profile", ["--threads", "0"], "--threads must be >= 1"),
    ("compile", ["--threads", "0", "--target", "latency"], "--threads must be >= 1"),
    ("compile", ["--threads", "2"], "add --target latency"),
    ("compile", ["--threads", "2", "--target", "macs"], "add --target latency"),
])
def test_thread_counts_are_checked_before_any_work(model_file, capsys, command, args, message):
    assert run([command, str(model_file), *args, *SHAPE]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err and err.count("\n") <= 2


def test_bench_restores_the_thread_count(model_file, capsys):
    before = torch.get_num_threads()
    assert run(["bench", str(model_file), "--runtime", "eager", "--rounds", "1", "--warmup", "0", "--threads", "2",
                *SHAPE]) == 0
    assert torch.get_num_threads() == before and "2 thread(s)" in capsys.readouterr().out


def test_bench_compiled_and_sparsity_is_a_usage_error(model_file, capsys):
    assert run(["bench", str(model_file), str(model_file), "--sparsity", "0.5", *SHAPE]) == 2
    assert "not both" in capsys.readouterr().err


def test_profile_bad_grid_exit_2(model_file, capsys):
    assert run(["profile", str(model_file), "--grid", "1.5", *SHAPE]) == 2
    assert "--grid" in capsys.readouterr().err
