"""The store's data engine: every read and write of an array's *data* goes through one `Engine`.

zarr-python keeps what it does well (groups, attributes, string arrays, what users open); the bytes of
the numeric arrays go through an engine. Two implementations, one interface:

- `TensorstoreEngine`: tensorstore's `zarr3` driver, compiled; the writer's engine for local stores
  (and `refseg-cache verify`'s reader). Writes are issued as futures, so the shards of all arrays of a
  stage are in flight at once (docs/DESIGN.md §6 says why tensorstore and not zarrs, with the
  measurements). `store_data_equal_to_fill_value` writes every chunk, zeros included, so a chunk that
  is absent is damage, never "all zeros"; a store made with checksums (format 2) is read with
  `fill_missing_data_reads` off, so an absent chunk is an error, and every chunk's CRC-32C is
  verified on read.
- `ZarrEngine`: zarr-python, for remote (fsspec) stores and for every *reader* (`Cache`, and so
  `FeatureDataset`). tensorstore cannot be used in a process forked after it started its threads (it
  aborts), and a DataLoader forks its workers from a process that has read the store; zarr-python has
  no such limit. Its crc32c codec verifies checksums on read; an absent chunk it would read as fill
  values, so in a format-2 store the engine first checks that the shard files of the rows exist.
  Single rows of local uncompressed arrays are read faster still by cache/fastread.py, with the same
  checks.

Failures come back as refseg errors: a damaged chunk as `DamagedCacheError` naming the array and the
rows (the caller adds the sample ids), a failed write as an `OSError` with the errno and file
tensorstore reported (the pipeline turns it into one line).
"""

from __future__ import annotations

import errno as errno_module
import os
import re
from typing import Protocol

import numpy as np
from zarr.core.sync import sync

from refseg.cache.layout import is_local, local_path
from refseg.core.errors import DamagedCacheError

# A write's bytes are in the file once its future is done; more in flight than this buys nothing on
# a local disk (bench/write.py)
FILE_IO_CONCURRENCY = 8
# tensorstore writes `<file>.__lock` beside each file it replaces and renames it into place; a
# process killed mid-write can leave one (removed by the next writer that is alone: cache/writer.py)
LOCK_DEBRIS_SUFFIX = ".__lock"

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


class Pending(Protocol):
    def result(self): ...


class _Done:
    """A write that finished when it was issued (zarr-python's synchronous path)."""

    def result(self):
        return None


def _row_runs(rows) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(inverse, runs): the sorted unique rows as (start, stop) runs of consecutive rows, and for each
    row asked for its index into their concatenation (any order, repeats allowed)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    return inverse, [(int(run[0]), int(run[-1]) + 1) for run in np.split(unique, breaks) if run.size]


class Engine:
    """Reads and writes rows of the arrays of one store; `key` is an array's path in it ("t0005/s8")."""

    def __init__(self, path: str, checksums: bool):
        self.path = path
        self.checksums = checksums  # format 2: every chunk written and checksummed, so absence is damage

    def write(self, key: str, start: int, data: np.ndarray) -> Pending:
        """Start writing `data` as rows start.. of `key`; `.result()` waits (and raises OSError on failure)."""
        raise NotImplementedError

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read_rows(self, key: str, rows) -> np.ndarray:
        """Rows by int, slice (step 1) or a sequence of ints (any order, repeats allowed)."""
        if isinstance(rows, (int, np.integer)):
            return self.read(key, int(rows), int(rows) + 1)[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape(key)[0])
            if step != 1:
                return self.read_rows(key, np.arange(start, stop, step))
            return self.read(key, start, max(start, stop))
        inverse, runs = _row_runs(rows)
        if not runs:
            return np.empty((0, *self.shape(key)[1:]), dtype=self.dtype(key))
        return np.concatenate([self.read(key, a, b) for a, b in runs])[inverse]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def damaged_rows(self, key: str, start: int, stop: int) -> dict[int, str]:
        """Row -> what is wrong, for the rows start..stop of `key` that cannot be read."""
        try:
            self.read(key, start, stop)
            return {}
        except DamagedCacheError:
            pass
        bad = {}
        for r in range(start, stop):  # the slow path, only where a read failed
            try:
                self.read(key, r, r + 1)
            except DamagedCacheError as exc:
                bad[r] = exc.detail
        return bad


class TensorstoreEngine(Engine):
    """A local store through tensorstore's zarr3 driver (arrays opened once, on first use)."""

    def __init__(self, path: str, checksums: bool):
        import tensorstore  # deferred: its library loads only where a local store is written

        super().__init__(path, checksums)
        self._ts = tensorstore
        self._root = local_path(path)
        # no chunk cache: other processes write the same store, and a read must see the files as they are now
        self._context = tensorstore.Context({"file_io_concurrency": {"limit": FILE_IO_CONCURRENCY},
                                             "cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[str, object] = {}

    def _array(self, key: str):
        array = self._arrays.get(key)
        if array is None:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(self._root, key)},
                    "fill_missing_data_reads": not self.checksums, "store_data_equal_to_fill_value": True}
            try:
                array = self._ts.open(spec, context=self._context, open=True).result()
            except ValueError as exc:
                raise DamagedCacheError(f"array {key} of cache {self.path} cannot be opened ({_first_line(exc)})",
                                        array=key) from None
            self._arrays[key] = array
        return array

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._array(key).dtype.numpy_dtype)

    def write(self, key: str, start: int, data: np.ndarray) -> Pending:
        array = self._array(key)
        rows_per_file = int(array.chunk_layout.write_chunk.shape[0])
        # the file the rows land in: the shard's, since the writer writes whole shards (cache/writer.py)
        file = os.path.join(self._root, key, "c", *map(str, (start // rows_per_file, *(0,) * (array.rank - 1))))
        return start_write(file, array[start:start + len(data)], data)

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        try:
            return self._array(key)[start:stop].read().result()
        except ValueError as exc:
            raise _damage(exc, key, start, stop) from None


def start_write(file: str, target, data: np.ndarray) -> Pending:
    """Start writing `data` to `target` (a tensorstore view), which lands in `file`: one function every
    write of the engine passes through, named by its file (where the fault tests inject a full disk)."""
    return _TensorstoreWrite(target.write(data), file)


class _TensorstoreWrite:
    def __init__(self, future, file: str):
        self._future, self._file = future, file

    def result(self):
        try:
            return self._future.result()
        except ValueError as exc:
            raise _os_error(exc) from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _os_error(exc: ValueError) -> OSError:
    """tensorstore's failed write as the OSError it wraps (errno and file), so the pipeline's one line
    says "No space left on device (ENOSPC) at <file>" as it does for any other write."""
    text = str(exc)
    code = _OS_ERROR_CODE.search(text)
    where = _LOCAL_FILE.search(text)
    number = int(code.group(1)) if code else errno_module.EIO
    return OSError(number, os.strerror(number), where.group(1) if where else None)


def _damage(exc: ValueError, key: str, start: int, stop: int) -> DamagedCacheError:
    text = _first_line(exc)
    where = _LOCAL_FILE.search(text)
    file = f" ({where.group(1)})" if where else ""
    if text.startswith("NOT_FOUND"):
        detail = f"chunk file missing{file}"
    elif text.startswith("DATA_LOSS") and "Digest mismatch" in text:
        detail = f"checksum mismatch{file}"
    else:
        detail = f"unreadable{file}: {text}"
    return DamagedCacheError(detail, array=key, rows=range(start, stop), detail=detail,
                             missing=text.startswith("NOT_FOUND"))


class ZarrEngine(Engine):
    """A store through zarr-python, on the store's opened root group (local, or an fsspec URL)."""

    def __init__(self, path: str, checksums: bool, root):
        super().__init__(path, checksums)
        self._root = root
        self._arrays: dict[str, object] = {}

    def _array(self, key: str):
        if key not in self._arrays:
            try:
                array = self._root[key]
            except KeyError:
                raise DamagedCacheError(f"array {key} of cache {self.path} has no metadata (zarr.json)",
                                        array=key) from None
            self._arrays[key] = array.with_config({"write_empty_chunks": True})
        return self._arrays[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._array(key).dtype)

    def write(self, key: str, start: int, data: np.ndarray) -> Pending:
        self._array(key)[start:start + len(data)] = data
        return _Done()

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        array = self._array(key)
        if self.checksums:  # every chunk was written: a shard file that is not there is damage, not zeros
            self._check_present(key, array, start, stop)
        try:
            return array[start:stop]
        except ValueError as exc:  # the crc32c codec: "Stored and computed checksum do not match"
            if "checksum" not in str(exc):
                raise
            detail = "checksum mismatch"
            raise DamagedCacheError(detail, array=key, rows=range(start, stop), detail=detail) from None


    def _check_present(self, key: str, array, start: int, stop: int) -> None:
        """DamagedCacheError (missing) if a stored chunk (a shard, for sharded arrays) of rows start..stop is absent."""
        if stop <= start:
            return
        rows_per_file = int(array.metadata.chunk_grid.chunk_shape[0])
        zeros = (0,) * (array.ndim - 1)
        store = array.store_path.store
        for shard in range(start // rows_per_file, (stop - 1) // rows_per_file + 1):
            name = f"{array.store_path.path}/{array.metadata.encode_chunk_key((shard, *zeros))}"
            if not sync(store.exists(name)):
                first, last = shard * rows_per_file, min((shard + 1) * rows_per_file, array.shape[0])
                detail = f"chunk file missing ({self.path.rstrip('/')}/{name})"
                raise DamagedCacheError(detail, array=key, rows=range(max(start, first), min(stop, last)),
                                        detail=detail, missing=True)


ENGINES = ("tensorstore", "zarr-python")


def open_engine(path: str, root, checksums: bool, engine: str = "tensorstore") -> Engine:
    """The writer's engine for the store at `path` (its opened zarr root group): tensorstore for a local
    store unless `engine` says "zarr-python" (bench/write.py, tests); zarr-python for an fsspec URL."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if is_local(path) and engine == "tensorstore":
        return TensorstoreEngine(path, checksums)
    return ZarrEngine(path, checksums, root)
