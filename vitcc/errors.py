"""Exceptions the vitcc CLI turns into a one-line message and an exit code, and the line for vitcc's own bugs."""
from __future__ import annotations

import signal
import sysconfig
import traceback
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

ISSUES_URL = "https://github.com/vitcc/vitcc/issues"


class VitccError(Exception):
    """Bad input or usage: the CLI prints str(e) on one line and exits with `exit_code`."""

    exit_code = 2


class VerificationError(VitccError):
    """The compiled model was checked against the original and does not match."""

    exit_code = 3


class Interrupted(BaseException):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) ends the command. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` swallows it and every `with Outputs` and `finally` removes its temporaries on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell shows for a process the signal ended: 130 SIGINT, 143 SIGTERM


_SIGNALS_RECEIVED: ContextVar[list[int] | None] = ContextVar("vitcc_signals_received", default=None)


@contextmanager
def signals_received_in(received: list[int]) -> Iterator[None]:
    """While a command runs, `received` holds the stop signals its handler has seen (the CLI's; none elsewhere)."""
    token = _SIGNALS_RECEIVED.set(received)
    try:
        yield
    finally:
        _SIGNALS_RECEIVED.reset(token)


def raise_if_signalled() -> None:
    """Raise Interrupted for a stop signal already received. The handler raised it once, but code that catches
    every exception (a library's bare `except`, a C extension clearing errors) can swallow it: points of no
    return (between passes, at each fine-tuning step, before outputs are renamed into place, when the command
    returns or fails) ask again, so the command still ends."""
    received = _SIGNALS_RECEIVED.get()
    if received:
        raise Interrupted(received[0])


def interruption_behind(exc: BaseException) -> Interrupted | None:
    """The Interrupted that an exception stands for, if any. A signal that lands while a C extension initialises
    (pybind11's modules: onnxruntime, matplotlib) comes back as ImportError("initialization failed") raised from it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none): what fits a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def internal_error_line(exc: BaseException) -> str:
    """One line for an exception that is vitcc's own bug: its type, where it was raised, and where to report it.

    The place is the innermost frame of the original exception (following `raise ... from`) that is not in
    Python's or an installed library's files: vitcc's code or a pass of the user's, where the bug is."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    frames = traceback.extract_tb(root.__traceback__)
    libs = {Path(sysconfig.get_path(k)).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    ours = [f for f in frames if not any(_inside(f.filename, lib) for lib in libs)]
    where = (ours or frames or [None])[-1]
    at = f" at {_short(where.filename)}:{where.lineno}" if where is not None else ""
    msg = (str(exc).strip().splitlines() or [""])[0]
    return (f"internal error in vitcc ({type(root).__name__}{at}): {msg}; please report it with the command you ran "
            f"at {ISSUES_URL} (VITCC_DEBUG=1 shows the traceback)")


def _inside(filename: str, folder: Path) -> bool:
    try:
        Path(filename).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _short(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else filename
