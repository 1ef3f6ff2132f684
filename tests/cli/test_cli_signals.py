"""Whatever ends `vitcc compile` (Ctrl-C, SIGTERM), it says so in one line, exits non-zero (128 + the signal's
number, as a shell reports it) and leaves no partial or temporary file behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitcc
from vitcc.cli import run
from vitcc.errors import Interrupted
from vitcc.pipeline.pass_base import Pass, register_pass

from conftest import tiny_vit

ROOT = Path(vitcc.__file__).resolve().parents[1]  # the child imports the vitcc these tests import
MAIN = "from vitcc.cli import main; main()"


def _default_signals() -> None:
    """In the child, before Python starts: a shell's background job inherits SIGINT ignored, and would keep it so."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_compiling_exits_non_zero_and_leaves_nothing(tmp_path, sig, code):
    model = tmp_path / "model.pt"
    torch.save(tiny_vit(), model)
    out = tmp_path / "out"
    out.mkdir()
    args = ["compile", str(model), "--input-shape", "1,3,32,32", "-o", str(out / "small.pt2"),
            "--onnx", str(out / "small.onnx"), "--report", str(out / "report.json")]
    proc = subprocess.Popen([sys.executable, "-c", MAIN, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list(out.iterdir())) < 3:  # the three temporaries: the paths are checked, the work begins
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "vitcc compile did not start"
            time.sleep(0.02)
        time.sleep(0.5)  # loading, capturing, pruning: seconds of work before anything is renamed into place
        assert proc.poll() is None, "finished before the signal"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"vitcc: interrupted by {sig.name}; unfinished outputs were removed"
    assert "verified" not in stdout
    assert sorted(p.name for p in out.iterdir()) == []


def _compile_with_a_pass_that_raises(tmp_path, make_error) -> int:

    @register_pass("test-raises")
    class Raises(Pass):
        def run(self, program):
            raise make_error()

    model = tmp_path / "model.pt"
    torch.save(tiny_vit(), model)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    code = run(["compile", str(model), "--input-shape", "1,3,32,32", "--passes", "magnitude,test-raises",
                "-o", str(tmp_path / "small.pt2"), "--report", str(tmp_path / "r.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # run() put them back
    return code


def test_ctrl_c_inside_a_pass_is_exit_130_and_one_line(tmp_path, capsys, declared_passes):
    """A KeyboardInterrupt that no signal handler of vitcc's raised (typer turns it into an exit code)."""
    assert _compile_with_a_pass_that_raises(tmp_path, KeyboardInterrupt) == 130
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGINT; unfinished outputs were removed"


def test_a_signal_wrapped_by_a_library_is_still_an_interruption(tmp_path, capsys, declared_passes):
    """A signal that lands while pybind11 initialises a module (onnxruntime, matplotlib) surfaces as
    ImportError("initialization failed") raised from vitcc's Interrupted: not an internal error, exit 143."""

    def wrapped() -> ImportError:
        error = ImportError("initialization failed")
        error.__cause__ = Interrupted(signal.SIGTERM)
        return error

    assert _compile_with_a_pass_that_raises(tmp_path, wrapped) == 143
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGTERM; unfinished outputs were removed"
