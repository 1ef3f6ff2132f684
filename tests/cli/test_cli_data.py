"""`vitcc compile --data ... --finetune-epochs` and `vitcc evaluate`, as a user runs them."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vitcc
from vitcc.cli import run

from conftest import tiny_vit


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_vit(img_size=8, patch_size=4), path)  # input shape 1,3,8,8 from its timm config
    return path


def test_compile_finetune_then_evaluate(tmp_path, model_file, capsys):
    out, rep, ckpt = tmp_path / "small.pt2", tmp_path / "report.json", tmp_path / "ckpt"
    code = run(["compile", str(model_file), "--passes", "taylor", "--sparsity", "0.5", "--data", "digits",
                "--finetune-epochs", "1", "--batch-size", "128", "--lr", "2e-3", "--seed", "3", "--mean", "0.5",
                "--std", "0.5", "--checkpoint-dir", str(ckpt), "-o", str(out), "--report", str(rep)])
    assert code == 0
    shown = capsys.readouterr().out
    assert "verified" in shown and "after fine-tuning: top-1" in shown and "accuracy before" in shown
    report = json.loads(rep.read_text())
    assert report["max_abs_error"] < 1e-4 and report["params_after"] < report["params_before"]
    assert report["finetune"]["epochs"] == 1 and report["finetune"]["distill"] is True
    assert report["finetune"]["seed"] == 3 and len(report["finetune"]["loss"]) == 1
    for key in ("accuracy_before", "accuracy_pruned", "accuracy_after"):
        assert report[key]["n"] == 359
    assert (ckpt / "epoch001.pt").exists()
    assert run(["evaluate", str(out), "--trust-pickle", "--data", "digits", "--mean", "0.5", "--std", "0.5", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc == report["accuracy_after"]  # the written model is the fine-tuned one
    assert run(["evaluate", str(out), "--trust-pickle", "--data", "digits", "--mean", "0.5", "--std", "0.5"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert isinstance(vitcc.load(out, trust_pickle=True), torch.fx.GraphModule)  # a pickled GraphModule needs trust until outputs are .pt2
    # a fresh process, as users run it: loading a compiled GraphModule must not depend on earlier imports
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "import sys, torch, vitcc; print(tuple(vitcc.load(sys.argv[1], trust_pickle=True)(torch.zeros(2, 3, 8, 8)).shape))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 10)", proc.stderr[-2000:]


def test_sparsity_epochs_reach_the_passes(tmp_path, model_file, capsys):
    rep = tmp_path / "r.json"
    assert run(["compile", str(model_file), "--passes", "vtp", "--sparsity", "0.3", "--data", "digits",
                "--sparsity-epochs", "2", "--batch-size", "256", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["vtp"]["epochs"] == 2 and report["max_abs_error"] < 1e-4
    err = capsys.readouterr().err  # the gate training says how it goes, also when stderr is not a terminal
    assert err.count("vtp gates epoch") == 2 and "vtp gates epoch 2/2  loss " in err and " img/s " in err


@pytest.fixture
def model5_file(tmp_path):
    path = tmp_path / "model5.pt"
    torch.save(tiny_vit(img_size=8, patch_size=4, num_classes=5), path)  # 5 classes: digits has 10
    return path


def test_the_recipe_with_a_new_classifier_is_in_the_report(tmp_path, model5_file, capsys):
    out, rep, ckpt = tmp_path / "small.pt2", tmp_path / "report.json", tmp_path / "ckpt"
    args = ["compile", str(model5_file), "--sparsity", "0.5", "--data", "digits", "--finetune-epochs", "2",
            "--batch-size", "128", "--mean", "0.5", "--std", "0.5", "--num-classes", "10", "--aa", "rand-m9-mstd0.5-inc1",
            "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--warmup-epochs", "1",
            "--ema", "0.99", "--drop-path", "0.1", "--precision", "bf16", "--device", "cpu",
            "--checkpoint-dir", str(ckpt), "-o", str(out), "--report", str(rep)]
    assert run(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("fine-tune epoch") == 2 and "left " in captured.err
    assert "EMA of the weights" in captured.out
    ft = json.loads(rep.read_text())["finetune"]
    assert {k: ft[k] for k in ("aa", "reprob", "mixup", "cutmix", "smoothing", "warmup_epochs", "ema", "drop_path",
                               "num_classes", "device", "precision", "world_size", "batch_size", "epochs")} == dict(
        aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, warmup_epochs=1.0, ema=0.99,
        drop_path=0.1, num_classes=10, device="cpu", precision="bf16", world_size=1, batch_size=128, epochs=2)
    assert ft["distill"] is False and len(ft["drop_path_rates"]) == 4 and len(ft["images_per_second"]) == 2
    assert (ckpt / "epoch002_ema.pt").exists()
    assert run(["evaluate", str(out), "--data", "digits", "--mean", "0.5", "--std", "0.5", "--device", "cpu",
                "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc == json.loads(rep.read_text())["accuracy_after"]  # the new 10-class head was written


@pytest.mark.cuda
def test_compile_fine_tunes_on_cuda(tmp_path, model_file):
    rep = tmp_path / "r.json"
    assert run(["compile", str(model_file), "--passes", "taylor", "--sparsity", "0.5", "--data", "digits",
                "--finetune-epochs", "1", "--device", "cuda", "--drop-path", "0.1", "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["finetune"]["device"].startswith("cuda")


def test_no_distill_and_default_normalisation(tmp_path, model_file):
    rep = tmp_path / "r.json"
    assert run(["compile", str(model_file), "--sparsity", "0.25", "--data", "digits", "--finetune-epochs", "1",
                "--batch-size", "256", "--no-distill", "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["finetune"]["distill"] is False


@pytest.mark.parametrize("args, message", [
    (["compile", "MODEL", "--finetune-epochs", "1"], "--finetune-epochs needs --data"),
    (["compile", "MODEL", "--data", "imagenet"], "unknown data 'imagenet'"),
    (["compile", "MODEL", "--passes", "taylor"], "needs calibration data"),
    (["compile", "MODEL", "--passes", "vtp", "--sparsity-epochs", "1"], "--sparsity-epochs needs --data"),
    (["compile", "MODEL", "--sparsity-epochs", "-1"], "--sparsity-epochs must be >= 0"),
    (["compile", "MODEL", "--data", "digits", "--mean", "a,b"], "--mean takes comma-separated numbers"),
    (["evaluate", "MODEL", "--data", "nowhere"], "unknown data 'nowhere'"),
    (["compile", "MODEL", "--device", "tpu"], "unknown --device 'tpu'"),
    (["compile", "MODEL", "--precision", "fp8"], "unknown --precision 'fp8'"),
    (["compile", "MODEL", "--mixup", "0.8", "--drop-path", "0.1"], "--mixup, --drop-path apply to fine-tuning"),
    (["compile", "MODEL", "--num-classes", "10"], "--num-classes applies to fine-tuning"),
    (["compile", "MODEL", "--finetune-epochs", "1", "--data", "digits", "--drop-path", "1.5"], "--drop-path must be in"),
    (["compile", "MODEL", "--finetune-epochs", "1", "--data", "digits", "--aa", "autoaugment"], "RandAugment policy"),
    (["compile", "MODEL5", "--finetune-epochs", "1", "--data", "digits"],
     "the data has 10 classes but the model has 5 outputs; pass --num-classes 10"),
    (["evaluate", "MODEL5", "--data", "digits"], "the data has 10 classes but"),
    *([] if torch.cuda.is_available() else [(["compile", "MODEL", "--device", "cuda"], "no CUDA device"),
                                            (["evaluate", "MODEL", "--data", "digits", "--device", "cuda:1"],
                                             "no CUDA device")]),
])
def test_bad_data_usage_is_one_line_exit_2(tmp_path, model_file, model5_file, capsys, args, message):
    out = tmp_path / "o.pt2"
    args = [str(model_file) if a == "MODEL" else str(model5_file) if a == "MODEL5" else a for a in args]
    assert run(args + (["-o", str(out)] if args[0] == "compile" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitcc: error:") and message in err and "Traceback" not in err
    assert not out.exists()
