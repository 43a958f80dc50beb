"""Inter-process locks for a local cache store: POSIX byte-range locks on one file, `CACHE.zarr.lock`.

Several processes may fill one store (`--shard i/n`, torchrun ranks, or the same command started
twice). The lock file lives next to the store, not inside it, so that replacing the store
(`--overwrite`) cannot delete a lock somebody holds and the store itself stays plain Zarr. Its bytes:

    byte 0                     the store's metadata: creating or replacing the store, adding a noise
                               level, recording bad samples (read-modify-write of zarr.json files)
    byte 1                     presence: every open writer holds it shared, so a writer that gets it
                               exclusively knows it is alone (and may clean up after dead writers)
    2 + stage * 2**32 + j      the claim on shard j of a stage: images, text, or one noise level

The kernel drops a process's locks when it exits, however it exits (even `kill -9`), so a crashed
writer never leaves a stale lock behind. POSIX record locks belong to a process, not to a file
descriptor, and closing *any* descriptor of the file drops them all: so a process opens each lock
file exactly once (shared by its `StoreLock`s) and closes it when the last user is done. Locks of one
process never conflict with each other; its threads are kept apart by a threading lock instead.

fcntl locks work on local disks and on NFS (through the NFS lock manager). An fsspec URL
(`s3://...`) has no locks: there, let one process (rank 0) create the store before the others start,
and give every process a distinct `--shard` part (docs/TROUBLESHOOTING.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time

from refseg.core.errors import CacheError

_METADATA = 0
_PRESENCE = 1
_CLAIMS = 2
_STAGE_SPAN = 2**32

# One open descriptor per lock file per process: {real path: [fd, users, threading lock]}.
_open_files: dict[str, list] = {}
_open_files_guard = threading.Lock()


def lock_path(store_path: str) -> str:
    """The lock file of a local store: `CACHE.zarr` -> `CACHE.zarr.lock`, next to it."""
    return os.path.normpath(os.path.abspath(store_path)) + ".lock"


def stage_index(stage) -> int:
    """"images" -> 0, "text" -> 1, noise level T -> 2 + T."""
    if stage == "images":
        return 0
    if stage == "text":
        return 1
    return 2 + int(stage)


class StoreLock:
    """The locks of one local store, as seen by this process. `close()` when done (or use `with`)."""

    def __init__(self, store_path: str, timeout: float = 600.0):
        self.path = lock_path(store_path)
        self.timeout = timeout  # seconds to wait for the metadata lock before giving up
        self._claims: set[int] = set()
        key = os.path.realpath(self.path)
        with _open_files_guard:
            entry = _open_files.get(key)
            if entry is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                entry = _open_files[key] = [fd, 0, threading.RLock()]
            entry[1] += 1
        self._key = key
        self._fd: int = entry[0]
        self._thread_lock: threading.RLock = entry[2]

    # ---- metadata ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def metadata(self):
        """Hold the store's metadata lock (blocking, up to `timeout` seconds)."""
        with self._thread_lock:
            deadline = time.monotonic() + self.timeout
            while not self._try(fcntl.LOCK_EX, _METADATA):
                if time.monotonic() > deadline:
                    raise CacheError(f"another process has held the lock {self.path} for over {self.timeout:.0f} s; "
                                     "if no refseg process is running, delete that file and retry")
                time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _METADATA)

    # ---- presence ---------------------------------------------------------------------------------
    def join(self) -> bool:
        """Register this process as a writer of the store. True if no other process is writing it.

        Call it while holding `metadata()`: a writer that is alone is the one that may clean up after
        dead writers or replace the store.
        """
        with self._thread_lock:
            alone = self._try(fcntl.LOCK_EX, _PRESENCE)
            # shared from here on (a downgrade if it was exclusive); only an exclusive holder, which
            # would hold the metadata lock we hold now, could make this wait
            fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, _PRESENCE)
            return alone

    # ---- shard claims -----------------------------------------------------------------------------
    def claim(self, stage, shard_index: int) -> bool:
        """Try to claim shard `shard_index` of `stage` for this process (never waits)."""
        offset = _CLAIMS + stage_index(stage) * _STAGE_SPAN + int(shard_index)
        with self._thread_lock:
            if offset in self._claims:
                return True
            if not self._try(fcntl.LOCK_EX, offset):
                return False
            self._claims.add(offset)
            return True

    def release(self, stage, shard_index: int) -> None:
        offset = _CLAIMS + stage_index(stage) * _STAGE_SPAN + int(shard_index)
        with self._thread_lock:
            if offset in self._claims:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
                self._claims.discard(offset)

    # ---- life -------------------------------------------------------------------------------------
    def _try(self, kind: int, offset: int) -> bool:
        try:
            fcntl.lockf(self._fd, kind | fcntl.LOCK_NB, 1, offset)
            return True
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def close(self) -> None:
        """Drop this object's claims; the last user in the process closes the file (dropping the rest)."""
        if self._fd < 0:
            return
        with self._thread_lock:
            for offset in list(self._claims):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
            self._claims.clear()
        with _open_files_guard:
            entry = _open_files[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                os.close(entry[0])  # drops every lock this process still holds on the file (presence)
                del _open_files[self._key]
        self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
