"""Assemble per-row results into whole cache shards and write them on a background thread.

The compute loop batches rows by `--batch-size`; the cache is written a whole shard at a time.
`ShardBuffer` decouples the two: rows arrive in any batch size, a shard is handed to the writer
thread as soon as its last row is in, so the GPU never waits for the disk (bounded queue: at most
`max_pending` shards in flight, which bounds host memory).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np


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
            self._parts[shard.start] = ({k: np.empty((n, *a.shape), a.dtype) for k, a in arrays.items()},
                                        np.zeros(n, dtype=bool), set())
        out, skipped_rows, rows_in = self._parts[shard.start]
        for k, a in arrays.items():
            out[k][row - shard.start] = a
        skipped_rows[row - shard.start] = skipped
        rows_in.add(row)
        if len(rows_in) == n:
            del self._parts[shard.start]
            self._flush(shard, out, skipped_rows)

    @property
    def pending_rows(self) -> int:
        return sum(len(rows_in) for _, _, rows_in in self._parts.values())
