"""The command line: `vitcc compile` and `vitcc inspect` (vitcc.cli.app), one file per further command, and
`run`, which turns every error into one line on stderr and an exit code."""
from __future__ import annotations

import os
import sys
import traceback

import typer

from vitcc.cli import bench, evaluate, passes, profile, report  # noqa: F401  (each declares its command)
from vitcc.cli.app import app, console
from vitcc.errors import VitccError, internal_error_line

__all__ = ["app", "main", "run"]


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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: every error becomes one line on stderr, never a traceback."""
    usage, exits, aborts = _click_exceptions()
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except VitccError as e:
        _say(str(e).strip().replace("\n", " "))
        return e.exit_code
    except exits as e:
        return e.exit_code
    except usage as e:
        message = e.format_message().strip().replace("\n", " ")
        if message:  # empty when the help was shown instead (no arguments)
            _say(message + " (see --help)")
        return 2
    except (*aborts, KeyboardInterrupt):
        return 130
    except MemoryError:
        _say("out of memory; try a smaller --input-shape (batch) or a smaller model")
        return 2
    except OSError as e:  # the machine, not vitcc: a full disk, a file that vanished, no permission
        _say(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
        return 2
    except Exception as e:
        if os.environ.get("VITCC_DEBUG") == "1":
            traceback.print_exc()
        _say(internal_error_line(e))
        return 1


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
