"""All-or-none outputs: every file a command writes is checked before any work, written to a temporary next
to it, and renamed into place only when everything succeeded; on any failure the temporaries are removed.

Checking up front means a bad `--report` path fails in a second, not after minutes of compiling, and never
after the model was already written. The temporary keeps the final suffix (`.small.x1y2.tmp.pt2`), so writers
that choose a format by suffix write the right one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable

from vitcc.errors import VitccError, raise_if_signalled


def _create(tmp: Path) -> None:
    """Create `tmp` with the mode any new file gets (mkstemp's would be 0600); FileExistsError if it exists."""
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


class Outputs:
    """The files one command writes; use as a context manager: commit on success, discard on any exception."""

    def __init__(self, inputs: Iterable[str | Path | None] = ()):
        self._inputs = {Path(i).resolve() for i in inputs if i is not None and Path(i).exists()}
        self._planned: list[tuple[str, Path, Path]] = []  # (flag, final path, temporary)

    def plan(self, path: str | Path | None, flag: str, suffixes: tuple[str, ...] = ()) -> Path | None:
        """The temporary to write `path` to, after checking that `path` can be written (and, given `suffixes`,
        names a format `flag` writes: a file named for one format must not hold another); None for no output."""
        if path is None:
            return None
        path = Path(path)
        check_writable_file(path, flag, suffixes)
        final = path.resolve()
        if final in self._inputs:
            raise VitccError(f"{flag} {path} would overwrite the input model; choose another path")
        other = next((f for f, p, _ in self._planned if p.resolve() == final), None)
        if other is not None:
            raise VitccError(f"{flag} {path} is also the path given to {other}; give each output its own file")
        if suffixes and path.suffix not in suffixes:
            names = " or ".join(suffixes)
            raise VitccError(f"{flag} {path}: unsupported suffix {path.suffix or '(none)'}; {flag} writes {names} "
                             f"files, e.g. {path.with_suffix(suffixes[0]).name}")
        while True:
            tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
            entry = (flag, path, tmp)
            self._planned.append(entry)  # before the file exists: a signal between the two leaves nothing behind
            try:
                _create(tmp)
                return tmp
            except FileExistsError:  # another file's name: not ours to remove
                self._planned.remove(entry)
            except OSError as e:
                self._planned.remove(entry)
                raise VitccError(f"cannot write {flag} {path}: {e.strerror or e} in {path.parent or '.'}; "
                                 "choose a folder you can write to") from None

    def commit(self) -> None:
        """Rename every temporary to its final path. A signal in the middle does not stop it half-way: the
        renames are finished first (the work is done), so the outputs are all there or none."""
        raise_if_signalled()  # the work was asked to stop: a swallowed signal must not publish its outputs
        planned = list(self._planned)
        try:
            for _, path, tmp in planned:
                os.replace(tmp, path)
        except OSError as e:
            raise VitccError(f"cannot write {e.filename}: {e.strerror or e}") from None
        except BaseException:  # Interrupted between two renames: the rest, where not renamed yet
            for _, path, tmp in planned:
                if tmp.exists():
                    os.replace(tmp, path)
            raise
        finally:
            self._planned = [p for p in planned if p[2].exists()]

    def discard(self) -> None:
        """Remove every temporary (what a writer left next to one, too: `<tmp>.tmp`)."""
        for _, _, tmp in self._planned:
            for leftover in (tmp, tmp.with_name(tmp.name + ".tmp")):
                leftover.unlink(missing_ok=True)
        self._planned = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


def check_writable_file(path: Path, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """One-line errors for a path that names a folder or lies in a folder that does not exist."""
    if path.is_dir():
        raise VitccError(f"{flag} {path} is a folder; name a file in it, e.g. "
                         f"{path / ('out' + (suffixes[0] if suffixes else path.suffix))}")
    parent = path.parent
    if not parent.exists():
        raise VitccError(f"output folder {parent} of {flag} does not exist; create it first")
    if not parent.is_dir():
        raise VitccError(f"{flag} {path}: {parent} is not a folder")


def check_folder(path: Path | None, flag: str) -> None:
    """A folder a command fills as it goes (checkpoints): it may not exist yet, but must not be a file."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise VitccError(f"{flag} {path} is a file; name a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise VitccError(f"{flag} {path}: cannot write in {existing}; choose a folder you can write to")
