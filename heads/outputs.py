"""Where a command will write, checked before it starts: a long evaluation must not fail at its
last step on a path it could have refused at once, and a refusal must leave nothing behind.

`check_writable` creates nothing that stays: it looks at the path, and proves the first folder that
exists can take a new entry by creating and removing one (permission bits alone do not say so for
root, a read-only mount or /proc). `make_dirs` remembers the folders it made, so that a set-up that
fails afterwards removes them again (`remove_empty`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from refseg.core.errors import RefsegError

PROBE_PREFIX = ".refseg-write-check-"  # the file a write check creates and removes at once


def nearest_existing(path: Path) -> Path:
    """`path` itself or the closest of its parents that exists (as anything: folder or file)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(path, what: str, *, directory: bool = False, error=RefsegError) -> None:
    """Refuse, in one line naming `what` (e.g. "--per-sample"), a path that cannot be written.

    `directory`: the path is a folder to write into (else a file to create or replace).
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise error(f"{what} {path} is a file, not a folder")
        if not directory and path.is_dir():
            raise error(f"{what} {path} is a folder, not a file")
        if not directory:
            _probe_file(path, what, error)
            return
    base = nearest_existing(path)
    if not base.is_dir():
        raise error(f"{what} {path} cannot be created: {base} is a file, not a folder")
    _probe_folder(base, path, what, error)


def _probe_folder(folder: Path, path: Path, what: str, error) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    except OSError as exc:
        raise error(f"{what} {path} cannot be written: creating a file in {folder} fails ({_why(exc)})") from None
    os.close(fd)
    os.unlink(probe)


def _probe_file(path: Path, what: str, error) -> None:
    try:
        with open(path, "ab"):  # appending nothing: the file and its times are unchanged
            pass
    except OSError as exc:
        raise error(f"{what} {path} cannot be written: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    return " ".join(str(exc.strerror or exc).split()).lower()


def make_dirs(path) -> list[Path]:
    """`mkdir -p path`; -> the folders it created, outermost first (none if `path` existed)."""
    path = Path(os.path.abspath(path))
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        created.append(folder)
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders `make_dirs` created, innermost first, as long as they are still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (someone wrote there) or already gone: leave it
            return


def same_file(a, b) -> bool:
    """Whether two paths name the same file or folder (either may not exist yet)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def inside(path, folder) -> bool:
    """Whether `path` is `folder` or lies under it (resolving links in what exists)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents
