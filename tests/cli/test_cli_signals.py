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
from vitcc.errors import Interrupted, VitccError
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


def _compile_with_a_pass_that(tmp_path, does) -> int:
    """The exit code of compiling with magnitude and a pass whose run() calls `does()`; a failed compile leaves
    nothing behind, and the signal handlers are put back."""

    @register_pass("test-pass")
    class Does(Pass):
        def run(self, program):
            does()

    work = tmp_path / "compile"
    work.mkdir()
    model = work / "model.pt"
    torch.save(tiny_vit(), model)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    hook = sys.unraisablehook
    code = run(["compile", str(model), "--input-shape", "1,3,32,32", "--passes", "magnitude,test-pass",
                "-o", str(work / "small.pt2"), "--report", str(work / "r.json")])
    written = sorted(p.name for p in work.iterdir())
    assert written == (["model.pt", "r.json", "small.pt2"] if code == 0 else ["model.pt"])
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # run() put them back
    assert sys.unraisablehook is hook
    return code


def _raise(make_error):
    def does():
        raise make_error()
    return does


def _wait_for_the_signal() -> None:
    """Python code the handler can interrupt, for longer than a signal takes to be delivered again."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_ctrl_c_inside_a_pass_is_exit_130_and_one_line(tmp_path, capsys, declared_passes):
    """A KeyboardInterrupt that no signal handler of vitcc's raised (typer turns it into an exit code)."""
    assert _compile_with_a_pass_that(tmp_path, _raise(KeyboardInterrupt)) == 130
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGINT; unfinished outputs were removed"


def test_a_signal_wrapped_by_a_library_is_still_an_interruption(tmp_path, capsys, declared_passes):
    """A signal that lands while pybind11 initialises a module (onnxruntime, matplotlib) surfaces as
    ImportError("initialization failed") raised from vitcc's Interrupted: not an internal error, exit 143."""

    def wrapped() -> ImportError:
        error = ImportError("initialization failed")
        error.__cause__ = Interrupted(signal.SIGTERM)
        return error

    assert _compile_with_a_pass_that(tmp_path, _raise(wrapped)) == 143
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGTERM; unfinished outputs were removed"


class _SignalsInItsFinaliser:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, where Python prints an exception and ignores it
            pass


def test_a_signal_in_a_finaliser_still_ends_the_command(tmp_path, capsys, declared_passes):
    """torch's weakref callbacks and __del__ methods run at any time; a signal landing in one is not lost."""

    def does():
        _SignalsInItsFinaliser()
        _wait_for_the_signal()

    assert _compile_with_a_pass_that(tmp_path, does) == 143
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGTERM; unfinished outputs were removed"


def test_a_signal_during_an_import_lands_after_it(tmp_path, capsys, declared_passes, monkeypatch):
    """Raised inside a module's initialisation it would leave the module half-made (a C extension turns it into
    ImportError, which libraries catch as "not installed", or aborts): it is raised after the import instead."""
    (tmp_path / "signals_while_imported.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nfor _ in range(100_000):\n    pass\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(tmp_path)
    imported = []

    def does():
        import signals_while_imported
        imported.append(signals_while_imported.COMPLETE)
        _wait_for_the_signal()

    assert _compile_with_a_pass_that(tmp_path, does) == 130
    assert imported == [True]
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGINT; unfinished outputs were removed"


def _swallows(sig: signal.Signals):
    """A pass body that receives `sig` and eats the Interrupted its handler raised, as a bare `except` would."""
    def does():
        try:
            os.kill(os.getpid(), sig)
            _wait_for_the_signal()
        except BaseException:
            pass
    return does


def test_a_signal_that_a_library_swallowed_still_ends_the_command(tmp_path, capsys, declared_passes):
    """Code that catches everything (a bare `except`, a C extension clearing errors) can eat the Interrupted the
    handler raised; the signal stays received, and the command ends before it publishes anything."""
    assert _compile_with_a_pass_that(tmp_path, _swallows(signal.SIGTERM)) == 143
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGTERM; unfinished outputs were removed"


def test_an_error_after_a_swallowed_signal_is_the_interruption_in_one_line(tmp_path, capsys, declared_passes):
    """The user asked the command to stop: whatever failed on the way there is not reported besides."""

    def swallows_then_fails():
        _swallows(signal.SIGTERM)()
        raise VitccError("a failure the stop caused")

    assert _compile_with_a_pass_that(tmp_path, swallows_then_fails) == 143
    assert capsys.readouterr().err.strip() == "vitcc: interrupted by SIGTERM; unfinished outputs were removed"


def test_a_swallowed_signal_ends_with_its_command(tmp_path, declared_passes):
    """The next command in the same process (a notebook, a test) runs to its end."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    assert _compile_with_a_pass_that(first, _swallows(signal.SIGINT)) == 130
    assert _compile_with_a_pass_that(second, lambda: None) == 0
