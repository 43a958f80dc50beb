"""A real small disk for full-disk tests: a tmpfs of a few KiB mounted under the test's folder (the dev
and CI machines run as root; elsewhere the test is skipped, saying why)."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str, fill_to_kib: int | None = None):
    """Mount a tmpfs of `size` (e.g. "64k") in a new folder under `parent`; optionally fill it with a
    file `filler` of `fill_to_kib` KiB first. Unmounted on the way out."""
    mount = Path(parent) / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        if fill_to_kib:
            (mount / "filler").write_bytes(b"\0" * fill_to_kib * 1024)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
