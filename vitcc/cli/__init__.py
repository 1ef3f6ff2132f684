"""The command line: `vitcc compile` and `vitcc inspect` (vitcc.cli.app), one file per further command, and
`run`, which turns every error into one line on stderr and an exit code."""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Iterator

import typer

from vitcc.cli import bench, evaluate, passes, profile, report  # noqa: F401  (each declares its command)
from vitcc.cli.app import app, console
from vitcc.deploy.timing import flush_subnormals_in_this_process
from vitcc.devices import out_of_memory, out_of_memory_line
from vitcc.errors import (Interrupted, VitccError, internal_error_line, interruption_behind, raise_if_signalled,
                          signals_received_in)

__all__ = ["app", "main", "run"]

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # what ends a command: its temporaries are removed on the way out


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, exits, aborts) of click and of the copy of click that newer typers carry (typer._click)."""
    usage, exits, aborts = [typer.BadParameter.__mro__[1]], [typer.Exit], [typer.Abort]
    usage += [c for c in (getattr(typer, "TyperException", None),) if c is not None]
    try:
        import click
        usage.append(click.exceptions.ClickException)
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # typer without click
        pass
    return tuple(usage), tuple(exits), tuple(aborts)


def _say(line: str) -> None:
    console.print(f"vitcc: error: {line}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def _signals_end_cleanly() -> Iterator[None]:
    """While a command runs, the signals that end it raise Interrupted, so that every `with Outputs` and `finally`
    removes its temporaries on the way out (SIGTERM's default ends the process on the spot, leaving them behind).

    Only the first raises: later ones wait for that cleanup. A raise that would be lost is made again 50 ms
    later: one in the import machinery (a C extension's initialisation turns it into an ImportError that a
    library may swallow, or aborts), or one that Python ignores (in a finaliser or a weakref callback). Should
    code that catches everything swallow it, the signal stays received: errors.raise_if_signalled asks between
    passes, at each fine-tuning step, before outputs are committed and when the command returns or fails. A
    signal the caller ignores (nohup) stays ignored; Python runs handlers in the main thread only, so elsewhere
    (run() from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []  # every stop signal, for raise_if_signalled: kept while a lost raise is made again
    fired: list[int] = []  # the signal whose Interrupted is on its way

    def deliver_later(signum: int) -> None:
        retry = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()

    def handler(signum: int, frame) -> None:
        if signum not in received:
            received.append(signum)
        if fired:
            return
        if _importing(frame):
            deliver_later(signum)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous_hook = sys.unraisablehook

    def unraisable(info) -> None:
        if isinstance(info.exc_value, Interrupted) and fired:
            fired.clear()
            deliver_later(info.exc_value.signum)
        else:
            previous_hook(info)

    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    sys.unraisablehook = unraisable
    try:
        with signals_received_in(received):
            yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _importing(frame) -> bool:
    """Whether the main thread is in the import machinery: a module's top level, or a C extension's
    initialisation calling back into Python."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupted(name: str) -> None:
    console.print(f"vitcc: interrupted by {name}; unfinished outputs were removed", markup=False, highlight=False)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: every error becomes one line on stderr, never a traceback."""
    usage, exits, aborts = _click_exceptions()
    try:
        with _signals_end_cleanly():
            code = _run(argv, usage, exits, aborts)
            raise_if_signalled()  # received, but swallowed before it could end the command
            return code
    except Interrupted as e:
        _interrupted(str(e))
        return e.exit_code
    except KeyboardInterrupt:  # a SIGINT outside the handler's reach
        _interrupted("SIGINT")
        return 130


def _run(argv: list[str] | None, usage: tuple, exits: tuple, aborts: tuple) -> int:
    try:
        try:
            code = app(args=argv, standalone_mode=False)
        except Exception as e:  # whatever it is, a signal behind it makes it an interruption
            if (signal_behind := interruption_behind(e)) is not None:
                raise signal_behind from None
            raise_if_signalled()  # so does one received on the way (whatever became of its raise): one line
            raise
        if code == 130:  # typer turns a KeyboardInterrupt into Exit(130), and returns an Exit's code
            _interrupted("SIGINT")
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except VitccError as e:
        if out_of_memory(e) is not None:  # e.g. a failed verification that was a device out of memory
            return _out_of_memory(e)
        _say(str(e).strip().replace("\n", " "))
        return e.exit_code
    except exits as e:
        return e.exit_code
    except usage as e:
        message = e.format_message().strip().replace("\n", " ")
        if message:  # empty when the help was shown instead (no arguments)
            _say(message + " (see --help)")
        return 2
    except aborts:  # click's Abort: end of input at a prompt
        console.print("vitcc: aborted", markup=False, highlight=False)
        return 130
    except MemoryError:
        _say("out of memory; try a smaller --input-shape (batch) or a smaller model")
        return 2
    except OSError as e:  # the machine, not vitcc: a full disk, a file that vanished, no permission
        _say(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
        return 2
    except Exception as e:
        if out_of_memory(e) is not None:
            return _out_of_memory(e)
        if os.environ.get("VITCC_DEBUG") == "1":
            traceback.print_exc()
        _say(internal_error_line(e))
        return 1


def _out_of_memory(e: BaseException) -> int:
    """A device out of memory where no command named its own options (they do, with devices.memory_hint)."""
    _say(out_of_memory_line(out_of_memory(e), "the batch size (--batch, --batch-size or --input-shape)"))
    return 2


def main() -> None:
    flush_subnormals_in_this_process()  # before torch starts a worker thread, so that all of them flush
    sys.exit(run())


if __name__ == "__main__":
    main()
