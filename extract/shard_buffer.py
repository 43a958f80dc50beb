"""Assemble per-row results into whole cache shards and write them on a background thread.

The compute loop batches rows by `--batch-size`; the cache is written a whole shard at a time.
`ShardBuffer` decouples the two: rows arrive in any batch size, a shard is handed to the writer
thread as soon as its last row is in, so the GPU never waits for the disk (bounded queue: at most
`max_pending` shards in flight, which bounds host memory). `StageWrites` holds one stage's claimed
shards and the thread writing them, and releases the claims once everything handed over is on disk.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np

from refseg.cache.stage_store import StageStore


class BackgroundWriter:
    """Runs `write(*args)` calls in order on one thread; re-raises its first error in the caller."""

    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="refseg-cache-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            if self._error is None:  # after a failure, drop the rest: nothing half-written is flagged done
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self._error = exc

    def submit(self, fn: Callable, *args) -> None:
        self.raise_if_failed()
        self._queue.put((fn, args))

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every submitted write; raise the first error any of them hit."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()


class ShardBuffer:
    """Collects rows of the shards in `shards` and calls `flush(shard, arrays)` once a shard is full.

    `arrays` maps a name to an array of the shard's rows in order; `skipped` rows (bad input kept out
    of the cache with --skip-bad) carry zeros and are passed as a boolean mask. `add` copies each row
    into its shard's arrays at once, so the caller may reuse what it passed (a pinned host buffer).
    """

    def __init__(self, shards: list[slice], flush: Callable[[slice, dict, np.ndarray], None]):
        self._flush = flush
        # shard-sized arrays whose shard is written, for the next shard to reuse: a fresh np.empty of a
        # whole shard (78 MB for SD1.5) costs a page fault per 4 KiB on first touch, most of the host's
        # copy time without reuse (bench/write.py)
        self._free: list[dict[str, np.ndarray]] = []
        self._free_lock = threading.Lock()
        self._shard_of: dict[int, slice] = {}
        for s in shards:
            for r in range(s.start, s.stop):
                self._shard_of[r] = s
        self._parts: dict[int, tuple[dict, np.ndarray, set]] = {}  # shard start -> (arrays, skipped, rows in)

    def add(self, row: int, arrays: dict[str, np.ndarray], skipped: bool = False) -> None:
        """Add one row's arrays (zeros of the right shapes when `skipped`)."""
        shard = self._shard_of[row]
        n = shard.stop - shard.start
        if shard.start not in self._parts:
            self._parts[shard.start] = (self._arrays_for(n, arrays), np.zeros(n, dtype=bool), set())
        out, skipped_rows, rows_in = self._parts[shard.start]
        for k, a in arrays.items():
            out[k][row - shard.start] = a
        skipped_rows[row - shard.start] = skipped
        rows_in.add(row)
        if len(rows_in) == n:
            del self._parts[shard.start]
            self._flush(shard, out, skipped_rows)

    def add_rows(self, first: int, arrays: dict[str, np.ndarray], count: int) -> None:
        """Add rows first..first+count-1 (consecutive, none skipped) at once: `arrays` hold `count` rows each.

        A shard the rows cover whole is flushed as views of `arrays`, without a copy; the caller must
        not write into `arrays` afterwards (the capture's results are fresh tensors per batch, and a
        view keeps its memory alive until the shard is written). Other rows are copied as by `add`.
        """
        row = first
        while row < first + count:
            shard = self._shard_of[row]
            stop = min(shard.stop, first + count)
            if row == shard.start and stop == shard.stop and shard.start not in self._parts:
                a, b = row - first, stop - first
                self._flush(shard, {k: v[a:b] for k, v in arrays.items()}, np.zeros(b - a, dtype=bool))
            else:
                for r in range(row, stop):
                    self.add(r, {k: v[r - first] for k, v in arrays.items()})
            row = stop

    def _arrays_for(self, n: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays for a shard of `n` rows like `row`: released ones of the same shapes, else new ones.
        Every row of a shard is added before it is flushed, so no value of the shard they held survives."""
        with self._free_lock:
            for i, free in enumerate(self._free):
                if free.keys() == row.keys() and all(free[k].shape == (n, *a.shape) and free[k].dtype == a.dtype
                                                     for k, a in row.items()):
                    return self._free.pop(i)
        return {k: np.empty((n, *a.shape), a.dtype) for k, a in row.items()}

    def release(self, arrays: dict[str, np.ndarray]) -> None:
        """`arrays` (from a flush) are written and may take another shard's rows (any thread may call this).
        Views flushed by `add_rows` are not kept: their memory is the caller's."""
        if not all(a.flags.owndata for a in arrays.values()):
            return
        with self._free_lock:
            if len(self._free) < 2:  # what the writer thread's queue can hold in flight
                self._free.append(arrays)

    @property
    def pending_rows(self) -> int:
        return sum(len(rows_in) for _, _, rows_in in self._parts.values())


class StageWrites:
    """The shards of one stage this process claimed, and the thread writing them.

    On leaving (normally or by an error) every shard already handed over is written, then the
    claims are released: a claim is held until the shard is on disk or the process is gone.
    """

    def __init__(self, store: StageStore, shards: list[slice]):
        self.store = store
        self.mine, self.others = store.claim(shards)
        self.io = BackgroundWriter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.io.close()  # raises the first write error, if any
        finally:
            self.store.release(self.mine)
        return False


def rows_of(shards: list[slice]) -> list[int]:
    return [r for s in shards for r in range(s.start, s.stop)]
