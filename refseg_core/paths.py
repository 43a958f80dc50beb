"""Where a command will write, checked before it starts: a long evaluation must not fail at its
last step on a path it could have refused at once, and a refusal must leave nothing behind.

`check_output_path` (extraction's store, the synthetic dataset, the demo) only looks at the path.
`check_writable` (the heads' run folders and eval outputs) creates nothing that stays: it looks at the path, and proves the first folder that
exists can take a new entry by creating and removing one (permission bits alone do not say so for
root, a read-only mount or /proc). `make_dirs` remembers the folders it made, so that a set-up that
fails afterwards removes them again (`remove_empty`).
"""

from __future__ import annotations

import contextlib
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


def check_output_path(path, what: str, flag: str = "--out") -> None:
    """Refuse, before anything is computed or written, an output folder that cannot be made at `path`.

    Catches the common bad paths (a file where the folder or one of its parents should be, a folder
    without write permission, a read-only file system) by looking, not by writing: nothing is created
    here. Whatever this cannot foresee is still said in the same terms when the write fails
    (`refseg.core.os_errors.describe_os_error`, `user_errors`).
    """
    path = os.fspath(path)
    if "://" in path and not path.startswith("file://"):
        return  # a remote (fsspec) URL: its own library reports its errors
    target = os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
    anchor = str(nearest_existing(target))
    if not os.path.isdir(anchor):
        raise RefsegError(f"cannot write {what} {path}: {_what_is_there(anchor, target)}, not a folder; "
                          f"choose another {flag}")
    readonly = getattr(os, "ST_RDONLY", 1)
    with contextlib.suppress(OSError):
        if os.statvfs(anchor).f_flag & readonly:
            raise RefsegError(f"cannot write {what} {path}: {anchor} is on a read-only file system; "
                              f"choose another {flag}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RefsegError(f"cannot write {what} {path}: no permission to write in {anchor}; choose another {flag} "
                          "or fix its permissions")


def _what_is_there(anchor: str, target: str) -> str:
    """"it is a file" / "X is a dangling symbolic link (to Y)": what stands where a folder should be."""
    subject = "it" if anchor == target else anchor
    if os.path.islink(anchor) and not os.path.exists(anchor):
        return f"{subject} is a dangling symbolic link (to {os.readlink(anchor)})"
    return f"{subject} is a file"


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
        raise error(f"{what} {path} cannot be created: {_what_is_there(str(base), '')}, not a folder")
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
