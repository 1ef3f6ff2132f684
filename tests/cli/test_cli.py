"""The command line as a user meets it: outputs, reports, exit codes and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vitcc
from vitcc.cli import run
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass

from conftest import can_flush, no_warnings, tiny_vit

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
    out, onnx, rep = tmp_path / "small.pt2", tmp_path / "small.onnx", tmp_path / "report.json"
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
    assert report["onnx"]["inputs"] == ["images"] and report["onnx"]["outputs"] == ["logits"]
    assert "images -> logits, dynamic batch" in shown
    with no_warnings():  # torch.export.load warns about an archive not named .pt2
        small = vitcc.load(out)  # a .pt2 program is data: no trust needed
        x = torch.randn(4, 3, 32, 32)
        assert small(x).shape == (4, 10)
        torch.testing.assert_close(torch.export.load(out).module()(x), small(x))  # no vitcc code needed


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
    out = tmp_path / "o.pt2"
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
    assert run(["compile", str(evil), "-o", str(tmp_path / "o.pt2")]) == 2
    err = error_line(capsys)
    assert "--trust-pickle" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "o.pt2").exists()


def test_never_overwrites_the_input(model_file, capsys):
    before = model_file.read_bytes()
    assert run(["compile", str(model_file), "-o", str(model_file), *SHAPE]) == 2
    assert "overwrite" in error_line(capsys)
    assert model_file.read_bytes() == before


def test_failed_verification_exits_3_and_writes_nothing(tmp_path, model_file, capsys, declared_passes):

    @register_pass("test-corrupt")
    class Corrupt(Pass):
        def run(self, program):  # a buggy method pass that edits weights of the graph being compiled
            with torch.no_grad():
                program.gm.get_submodule("blocks.0.mlp.fc1").weight.mul_(1.5)
            return PassResult()

    out, rep = tmp_path / "o.pt2", tmp_path / "r.json"
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


# -- bad input: exit 2, one line saying what is wrong and what to do, nothing written ------------------------------

def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "abc"], "Invalid value for '--sparsity'"),
    (["--align", "0"], "--align must be >= 1"),
    (["--align", "-3"], "--align must be >= 1"),
    (["--target", "flops"], "unknown --target 'flops'; use channels, params, macs, latency"),
    (["--passes", "magnitude{q=3}"], "unknown option 'q' in magnitude{q=3}; valid options of magnitude: p: float"),
    (["--passes", "magnitude{p=abc}"], "option p takes a float"),
    (["--passes", "select{align=0}"], "align must be >= 1"),
    (["--input-shape", "1,3"], "--input-shape 1,3 does not fit VisionTransformer: it takes images (N, 3, H, W); "
                               "pass e.g. --input-shape 1,3,32,32"),
    (["--input-shape", "1,3,16,16"], "cannot run on --input-shape 1,3,16,16: Input height (16) doesn't match"),
    (["--input-shape", "100000,3,1000,1000"], "300,000,000,000 elements, more than the 268,435,456"),
    (["--input-shape", "0,3,32,32"], "expected positive integers"),
    (["--no-such-flag"], "No such option: --no-such-flag"),
    (["--finetune-epochs", "x"], "Invalid value for '--finetune-epochs'"),
])
def test_bad_values_are_one_line_exit_2_and_write_nothing(tmp_path, model_file, capsys, args, message):
    before = listing(tmp_path)
    code = run(["compile", str(model_file), *SHAPE, *args, "-o", str(tmp_path / "o.pt2"), "--report",
                str(tmp_path / "r.json")])
    assert code == 2
    err = error_line(capsys)
    assert message in err and "\n" not in err
    assert listing(tmp_path) == before


@pytest.mark.parametrize("which", ["-o", "--onnx", "--report"])
def test_bad_output_paths_fail_before_any_work_and_write_nothing(tmp_path, model_file, capsys, unwritable_dir,
                                                                 which):
    folder = tmp_path / "existing"
    folder.mkdir()
    good = {"-o": tmp_path / "o.pt2", "--onnx": tmp_path / "o.onnx", "--report": tmp_path / "r.json"}
    for bad, message in ((folder, "is a folder; name a file in it"),
                         (tmp_path / "missing" / good[which].name, "does not exist; create it first"),
                         (unwritable_dir / good[which].name, "cannot write"),
                         (model_file, "would overwrite the input model")):
        before = listing(tmp_path)
        paths = {**good, which: bad}
        code = run(["compile", str(model_file), *SHAPE, *(a for k, v in paths.items() for a in (k, str(v)))])
        assert code == 2, bad
        err = error_line(capsys)
        assert message in err and which in err
        assert listing(tmp_path) == before and listing(folder) == []


def test_two_outputs_on_one_path_is_an_error(tmp_path, model_file, capsys):
    x = str(tmp_path / "x.pt2")
    assert run(["compile", str(model_file), *SHAPE, "-o", x, "--report", x]) == 2
    assert "is also the path given to -o" in error_line(capsys)
    assert listing(tmp_path) == ["model.pt"]


def test_checkpoint_dir_that_is_a_file(tmp_path, model_file, capsys):
    assert run(["compile", str(model_file), *SHAPE, "--checkpoint-dir", str(model_file)]) == 2
    assert "--checkpoint-dir" in error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["inspect", "MODEL", "--input-shape", "1,3"], "does not fit VisionTransformer"),
    (["inspect", "MODEL", "--input-shape", "9999,3,999,999"], "elements, more than"),
    (["bench", "MODEL", *SHAPE, "--align", "0"], "--align must be >= 1"),
    (["bench", "MODEL", *SHAPE, "--sparsity", "abc"], "Invalid value for '--sparsity'"),
    (["bench", "MODEL", *SHAPE, "--sparsity", "0.5", "--passes", "magnitude{q=3}"], "unknown option 'q'"),
    (["bench", "MODEL", *SHAPE, "--json", "DIR"], "is a folder"),
    (["bench", "MODEL", *SHAPE, "--json", "DIR/missing/b.json"], "does not exist"),
    (["profile", "MODEL", *SHAPE, "--json", "DIR"], "is a folder"),
    (["profile", "MODEL", *SHAPE, "-o", "DIR/table.txt"], "table.txt: unsupported suffix .txt; -o writes .json files"),
    (["bench", "MODEL", *SHAPE, "--json", "DIR/b.csv"], "unsupported suffix .csv; --json writes .json files"),
    (["profile", "MODEL", "--input-shape", "1,3"], "does not fit"),
    (["profile", "MODEL", *SHAPE, "--align", "abc"], "Invalid value for '--align'"),
    (["evaluate", "MODEL", "--data", "digits", "--input-shape", "1,3"], "does not fit"),
    (["evaluate", "MODEL"], "Missing option '--data'"),
    (["passes", "--bogus"], "No such option: --bogus"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_every_command_gives_one_line_for_bad_input(tmp_path, model_file, capsys, args, message):
    args = [str(model_file) if a == "MODEL" else a.replace("DIR", str(tmp_path)) for a in args]
    before = listing(tmp_path)
    assert run(args) == 2
    assert message in error_line(capsys)
    assert listing(tmp_path) == before


def test_vitcc_bug_is_exit_1_with_where_to_report_it(tmp_path, model_file, capsys, monkeypatch, declared_passes):

    @register_pass("test-crash")
    class Crash(Pass):
        def run(self, program):
            return {}["missing"]  # a bug

    args = ["compile", str(model_file), *SHAPE, "--passes", "magnitude,test-crash", "-o", str(tmp_path / "o.pt2")]
    assert run(args) == 1
    err = error_line(capsys)
    assert err.startswith("vitcc: error: internal error in vitcc (KeyError at cli/test_cli.py:")
    assert "https://github.com/vitcc/vitcc/issues" in err and "\n" not in err
    assert listing(tmp_path) == ["model.pt"]
    monkeypatch.setenv("VITCC_DEBUG", "1")
    assert run(args) == 1
    assert "Traceback" in capsys.readouterr().err  # asked for


def test_no_arguments_shows_the_help(capsys):
    assert run([]) == 2
    shown = capsys.readouterr()
    assert "Usage" in shown.out + shown.err and "error" not in shown.err


def test_passes_lists_every_pass_with_its_options(capsys):
    assert run(["passes", "--json"]) == 0
    info = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {"magnitude", "lamp", "gohsp", "select", "verify"} <= set(info)
    assert info["magnitude"]["options"] == [{"name": "p", "type": "float", "default": 2, "help": "norm order > 0: 1 or 2"}]
    assert info["select"]["kind"] == "structural"
    assert run(["passes"]) == 0
    assert "taylor" in capsys.readouterr().out


def test_outputs_get_the_permissions_of_any_new_file(tmp_path, model_file):
    """Written through temporaries, but not with mkstemp's private 0600."""
    out, report = tmp_path / "small.pt2", tmp_path / "r.json"
    assert run(["compile", str(model_file), "--sparsity", "0.3", "-o", str(out), "--report", str(report),
                *SHAPE]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in (out, report))


# -- what a new user trips over --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, name, right", [("-o", "out.txt", "out.pt2"), ("-o", "small.pt", "small.pt2"),
                                               ("-o", "small", "small.pt2"), ("-o", "small.PT2", "small.pt2"),
                                               ("--onnx", "small.txt", "small.onnx")])
def test_an_unsupported_output_suffix_is_refused_before_any_work(tmp_path, model_file, capsys, flag, name, right):
    before = listing(tmp_path)
    assert run(["compile", str(model_file), *SHAPE, flag, str(tmp_path / name)]) == 2
    err = error_line(capsys)
    assert f"{flag} {tmp_path / name}: unsupported suffix" in err and f"e.g. {right}" in err and "\n" not in err
    assert listing(tmp_path) == before


def test_version(capsys):
    from importlib.metadata import version
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vitcc {version('vitcc')} (torch {torch.__version__})"


def test_every_command_describes_model_with_one_help_string(capsys):
    """One string for MODEL in every command that takes it, so that no command forgets a source (hf:, .pt2)."""
    import typer
    from vitcc.cli.app import MODEL_HELP, app
    commands = typer.main.get_command(app).commands
    takes_model = {name for name, c in commands.items() if any(p.name == "model" for p in c.params)}
    assert {"compile", "inspect", "bench", "profile", "evaluate"} <= takes_model
    for name in takes_model:
        (param,) = [p for p in commands[name].params if p.name == "model"]
        assert param.help == MODEL_HELP, name
    for source in ("timm:NAME", "torchvision:NAME", "hf:DIR", "py:MODULE:CALLABLE", "(.pt2)", "(.pt)"):
        assert source in MODEL_HELP
    for name in ("bench", "profile"):
        assert run([name, "--help"]) == 0
        shown = capsys.readouterr().out
        assert all(source in shown for source in ("hf:DIR", "torchvision:NAME", "py:MODULE:CALLABLE", "(.pt2)"))


def test_inspect_counts_branch_parameter_elements(model_file, capsys):
    model = torch.load(model_file, weights_only=False)
    assert run(["inspect", str(model_file), "--json", *SHAPE]) == 0
    branches = {b["name"]: b for b in json.loads(capsys.readouterr().out)["branches"]}
    block = model.blocks[0]
    attn = sum(p.numel() for m in (block.norm1, block.attn) for p in m.parameters())
    mlp = sum(p.numel() for m in (block.norm2, block.mlp) for p in m.parameters())
    assert branches["blocks.0.attn"]["param_elements"] == attn > len(branches["blocks.0.attn"]["params"])
    assert branches["blocks.0.mlp"]["param_elements"] == mlp
    assert run(["inspect", str(model_file), *SHAPE]) == 0
    shown = capsys.readouterr().out
    assert "(elements)" in shown and f"{attn:,}" in shown and f"{mlp:,}" in shown


@can_flush
@pytest.mark.parametrize("workers_started_first", [False, True])
def test_the_vitcc_process_flushes_subnormals_in_every_thread_torch_starts(workers_started_first):
    """A thread keeps the float mode it started with: `vitcc` sets it before torch's intra-op workers start, so
    they flush too (started before, a worker's half of the product stays subnormal)."""
    script = ("import sys, numpy as np, torch, vitcc.cli as cli\n"
              "torch.set_num_threads(2)\n"
              "x = torch.from_numpy(np.full(1 << 20, 1e-39, dtype=np.float32))  # (numpy: no worker started)\n"
              + ("torch.ones(1 << 20).mul_(2)\n" if workers_started_first else "") +
              "cli.run = lambda: print(int((x * 1.0).count_nonzero()))\n"
              "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    left = int(done.stdout.split()[-1])
    assert (left > 0) if workers_started_first else (left == 0)
