"""Single rows of a local, uncompressed cache array, read straight from its shard files.

Why: a synchronous zarr read is a round trip to zarr's event-loop thread plus codec-pipeline
bookkeeping, whatever the size, and a training item is several such reads. One `os.preadv` per
tensor straight into the output array avoids both; the speeds of either reader against the raw-file
floor are measured by bench/read.py (BENCHMARKS.md, "Cache reads").

It applies only where the bytes on disk are the array's bytes: a local store, a sharded array with
one row per inner chunk, inner codecs = little-endian `bytes` (+ `crc32c`, format 2) with no
compression (the store's codec is `none`) or zstd alone (format 3's GT masks: the row's frame is read,
its CRC checked, then decompressed straight into the output), the shard index at the end, encoded
`bytes` (+ `crc32c`).
`ShardRowReader.for_array` returns None for anything else, and `Cache` then reads through the engine
(cache/engine.py): same values either way (tested). The engine (tensorstore) reads one row at a time
at a third of this reader's speed (bench/write.py, BENCHMARKS.md "Data engine"), which is why this
reader stays for the training loader's single-row reads.

The shard format (Zarr v3 sharding codec): the inner chunks' bytes, then an index of one
(offset, nbytes) little-endian uint64 pair per inner chunk, then the index's CRC-32C. In a format-2
store each inner chunk is the row's bytes followed by their CRC-32C, which is verified on every read,
and every chunk is written: a chunk marked absent (2**64-1, 2**64-1) or a shard file that does not
exist is damage (`DamagedCacheError`). In a format-1 store such a chunk held only the fill value
(zarr does not write those) and reads as it.

A batch's rows of PARALLEL_ROW_BYTES and more are read on a few threads (`ShardFiles.map`): a copy
from the page cache and its checksum each keep a core busy, and both release the GIL.

Open shard files are kept, with their index, in a small LRU (`ShardFiles`): the index read with a
file always describes that very file, so a shard replaced later (files are written by rename) is
never read through a stale index. FeatureDataset reads only rows whose `done` flag is set, and the
writer sets it after its last write to that shard (cache/writer.py), so a file kept open is final.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from crc32c import crc32c  # releases the GIL, and 1.4-2x google_crc32c's speed here (docs/DESIGN.md §6)
from numcodecs import Zstd  # what zarr's zstd codec decodes with
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from refseg.cache.layout import is_local, local_path
from refseg.core.errors import CacheError, DamagedCacheError

_ZSTD = Zstd()  # stateless: decodes any frame, whatever level wrote it
EMPTY = 2**64 - 1  # zarr's marker for an inner chunk with no bytes in the shard
DEFAULT_OPEN_FILES = 64  # per Cache (per DataLoader worker): shuffled reads rarely revisit a shard
# Rows read at once per Cache: a copy from the page cache and its checksum keep one core busy, and the
# second core doubles the loader's speed on a 2-core machine (bench/read.py); more rarely pays
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DEFAULT_READ_THREADS = min(4, _CORES)
PARALLEL_ROW_BYTES = 512 * 1024  # smaller rows are read in turn: a thread's hand-off costs more than it saves


class _OpenShard:
    """One open shard file: its descriptor, its decoded index, and how many reads are using it now."""

    __slots__ = ("fd", "index", "readers", "evicted")

    def __init__(self, fd: int, index: list):
        self.fd, self.index, self.readers, self.evicted = fd, index, 0, False


class _Reads:
    """One `ShardFiles.map` call's reads, as its threads run them: `stop()` keeps every read not yet
    started from starting, wherever the interrupt came (a future the caller never got included), and
    returns once the running ones have ended."""

    def __init__(self, read):
        self.read, self.stopped, self.running = read, False, 0
        self.changed = threading.Condition()

    def __call__(self, item) -> None:
        with self.changed:
            if self.stopped:
                return
            self.running += 1
        try:
            self.read(item)
        finally:
            with self.changed:
                self.running -= 1
                self.changed.notify_all()

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.wait_for(lambda: self.running == 0)


class ShardFiles:
    """An LRU of open shard files, each with its decoded index ([(offset, nbytes)] per inner chunk), and
    the threads that read rows from them (`map`).

    Thread-safe: the lock guards the LRU only, and reads run outside it, in parallel. A file evicted while
    a read uses it is closed when that read ends, so a descriptor is never closed (and its number reused
    for another file) under a reader. The DataLoader's workers are processes, each with its own.
    """

    def __init__(self, capacity: int = DEFAULT_OPEN_FILES, threads: int | None = None):
        self.capacity = max(1, int(capacity))
        self.threads = DEFAULT_READ_THREADS if threads is None else max(1, int(threads))
        self._files: OrderedDict[str, _OpenShard] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    def read(self, path: str, chunks_per_shard: int, has_crc: bool, chunk: int, out: np.ndarray,
             chunk_crc: bool = False, zstd: bool = False) -> bool:
        """Fill `out` with inner chunk `chunk` of the shard file at `path`; with `chunk_crc` the chunk
        ends in its CRC-32C, which is checked (format 2); with `zstd` the chunk is a zstd frame.

        False (out untouched) when the shard file or the chunk does not exist: the caller decides what
        that means. DamagedCacheError on a chunk that fails its checksum, CacheError on a torn or
        corrupt file.
        """
        shard = self._acquire(path, chunks_per_shard, has_crc)
        if shard is None:
            return False
        try:
            offset, nbytes = shard.index[chunk]
            if offset == EMPTY and nbytes == EMPTY:
                return False
            if zstd:
                return _decode_frame(os.pread(shard.fd, nbytes, offset), nbytes, path, chunk, out, chunk_crc)
            _read_plain(shard.fd, path, chunk, offset, nbytes, out, chunk_crc)
            return True
        finally:
            self._release(shard)

    def map(self, read, items, parallel: bool = True) -> None:
        """`read(item)` for every item, on this process's read threads (in turn when not `parallel`);
        once all have ended, the first failure in the items' order is raised (the same error whatever
        the threads' timing)."""
        items = list(items)
        if not parallel or self.threads == 1 or len(items) < 2:
            for item in items:
                read(item)
            return
        executor, reads, futures = self._executor(), _Reads(read), []
        try:
            for item in items:  # a Ctrl-C may come while the first reads run, even between submit and append
                futures.append(executor.submit(reads, item))
            errors = [future.exception() for future in futures]  # waits for each
        except BaseException:  # Ctrl-C: no read writes into the caller's array after this returns
            reads.stop()  # no read starts after this, and those running (a row each) end first
            for future in futures:
                future.cancel()
            raise
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    def _executor(self) -> ThreadPoolExecutor:
        # a forked child inherits the parent's pool object but none of its threads: a task given to it
        # would never run
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="refseg-shard-read")
            self._pool_pid = os.getpid()
        return self._pool

    def _acquire(self, path: str, n: int, has_crc: bool) -> _OpenShard | None:
        with self._lock:
            shard = self._files.get(path)
            if shard is None:
                shard = self._open(path, n, has_crc)
                if shard is None:
                    return None
            else:
                self._files.move_to_end(path)
            shard.readers += 1
            return shard

    def _release(self, shard: _OpenShard) -> None:
        with self._lock:
            shard.readers -= 1
            if shard.evicted and shard.readers == 0:
                os.close(shard.fd)

    def _open(self, path: str, n: int, has_crc: bool) -> _OpenShard | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            index = _read_index(fd, path, n, has_crc)
        except BaseException:
            os.close(fd)
            raise
        shard = self._files[path] = _OpenShard(fd, index)
        while len(self._files) > self.capacity:
            self._evict(self._files.popitem(last=False)[1])
        return shard

    @staticmethod
    def _evict(shard: _OpenShard) -> None:
        shard.evicted = True
        if shard.readers == 0:  # else the last read using it closes it (_release)
            os.close(shard.fd)

    def close(self) -> None:
        """Close every file no read is using (the others when their reads end) and stop the read threads."""
        with self._lock:
            while self._files:
                self._evict(self._files.popitem()[1])
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.shutdown(wait=False)  # a read that follows starts new ones
            self._pool = None

    def __len__(self) -> int:
        return len(self._files)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone already
            pass


def _read_plain(fd: int, path: str, chunk: int, offset: int, nbytes: int, out: np.ndarray, chunk_crc: bool) -> None:
    """An uncompressed chunk straight into `out` with one preadv; with `chunk_crc`, its CRC-32C checked."""
    expected = out.nbytes + (4 if chunk_crc else 0)
    if nbytes != expected:
        raise CacheError(f"shard file {path}: chunk {chunk} holds {nbytes} bytes, expected {expected} "
                         f"(a compressed or foreign shard?)")
    crc = bytearray(4)
    data = memoryview(out).cast("B")
    got = os.preadv(fd, [data, crc] if chunk_crc else [data], offset)
    if got != nbytes:
        raise CacheError(f"shard file {path} is truncated: chunk {chunk} ends past the end of the file")
    if chunk_crc and crc32c(data) != int.from_bytes(crc, "little"):
        raise DamagedCacheError(f"checksum mismatch ({path})", detail=f"checksum mismatch ({path})")


def _decode_frame(frame: bytes, nbytes: int, path: str, chunk: int, out: np.ndarray, chunk_crc: bool) -> bool:
    """A zstd chunk's bytes (then its CRC-32C with `chunk_crc`) decoded into `out`."""
    if len(frame) != nbytes:
        raise CacheError(f"shard file {path} is truncated: chunk {chunk} ends past the end of the file")
    if chunk_crc:
        frame, crc = frame[:-4], frame[-4:]
        if crc32c(frame) != int.from_bytes(crc, "little"):
            raise DamagedCacheError(f"checksum mismatch ({path})", detail=f"checksum mismatch ({path})")
    try:
        decoded = _ZSTD.decode(frame, out=out.reshape(-1).view(np.uint8))
    except Exception as exc:  # a frame that passed its CRC but is not the row: written by something else
        raise CacheError(f"shard file {path}: chunk {chunk} does not decode as a zstd frame of this array's rows "
                         f"({exc})") from exc
    if np.asarray(decoded).nbytes != out.nbytes:
        raise CacheError(f"shard file {path}: chunk {chunk} decodes to {np.asarray(decoded).nbytes} bytes, "
                         f"expected {out.nbytes}")
    return True


def _read_index(fd: int, path: str, n: int, has_crc: bool) -> list[tuple[int, int]]:
    size = os.fstat(fd).st_size
    index_bytes = 16 * n + (4 if has_crc else 0)
    if size < index_bytes:
        raise CacheError(f"shard file {path} is truncated ({size} bytes, shorter than its index)")
    raw = os.pread(fd, index_bytes, size - index_bytes)
    if has_crc:
        if crc32c(raw[:16 * n]) != int.from_bytes(raw[16 * n:], "little"):
            raise CacheError(f"shard file {path} is corrupt: its index fails its CRC-32C check")
    index = [tuple(pair) for pair in np.frombuffer(raw[:16 * n], dtype="<u8").reshape(n, 2).tolist()]
    ends = [offset + nbytes for offset, nbytes in index if offset != EMPTY]
    if ends and max(ends) > size - index_bytes:
        raise CacheError(f"shard file {path} is corrupt: its index points past the chunk data")
    return index


class ShardRowReader:
    """`reader.row(r)` -> row `r` of one array, as a new numpy array, read with one `os.preadv`;
    `reader.rows(rows)` -> several rows stacked, each read straight into its place in the output."""

    def __init__(self, folder: str, key_of, row_shape: tuple, dtype: np.dtype, rows_per_shard: int,
                 n_rows: int, fill_value, has_crc: bool, files: ShardFiles, chunk_crc: bool = False,
                 zstd: bool = False):
        self.folder, self._key_of = folder, key_of
        self.row_shape, self.dtype = row_shape, dtype
        self.rows_per_shard, self.n_rows = rows_per_shard, n_rows
        self.fill_value, self.has_crc, self.files = fill_value, has_crc, files
        self.chunk_crc = chunk_crc  # format 2: each row's chunk ends in its CRC-32C, and every chunk exists
        self.zstd = zstd  # each row's chunk is a zstd frame
        self._paths: dict[int, str] = {}  # shard number -> file path

    @classmethod
    def for_array(cls, array, files: ShardFiles) -> "ShardRowReader | None":
        """A reader for `array` (a zarr.Array), or None when its bytes on disk are not plain rows."""
        store = array.store_path.store
        root = getattr(store, "root", None)
        if root is None or not is_local(str(root)) or sys.byteorder != "little":
            return None
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
            return None
        (sharding,) = meta.codecs
        if not isinstance(sharding, ShardingCodec) or sharding.index_location.value != "end":
            return None
        row_shape = tuple(meta.shape[1:])
        if tuple(sharding.chunk_shape) != (1, *row_shape):
            return None
        inner = list(sharding.codecs)
        zstd = len(inner) > 1 and isinstance(inner[1], ZstdCodec)
        if zstd:
            del inner[1]  # a zstd frame per row (format 3's GT masks), decoded by _decode_frame
        if not isinstance(inner[0], BytesCodec) or len(inner) > 2 or not all(isinstance(c, Crc32cCodec) for c in inner[1:]):
            return None
        index_codecs = sharding.index_codecs
        if not (isinstance(index_codecs[0], BytesCodec) and len(index_codecs) <= 2
                and all(isinstance(c, Crc32cCodec) for c in index_codecs[1:])):
            return None
        dtype = np.dtype(meta.dtype.to_native_dtype())
        if dtype.kind not in "biuf" or dtype.byteorder == ">":
            return None
        endian = sharding.codecs[0].endian
        if dtype.itemsize > 1 and (endian is None or endian.value != "little"):
            return None
        if index_codecs[0].endian is not None and index_codecs[0].endian.value != "little":
            return None
        folder = os.path.join(local_path(str(root)), array.store_path.path)
        zeros = (0,) * len(row_shape)
        return cls(folder, lambda s: meta.encode_chunk_key((s, *zeros)), row_shape, dtype,
                   int(meta.chunk_grid.chunk_shape[0]), int(meta.shape[0]), meta.fill_value,
                   len(index_codecs) == 2, files, chunk_crc=len(inner) == 2, zstd=zstd)

    def row(self, r: int) -> np.ndarray:
        out = np.empty(self.row_shape, dtype=self.dtype)
        self.read_into(r, out)
        return out

    def rows(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows by slice (step 1) or a sequence of ints, stacked: (n, *row_shape); into `out` when given
        (C-contiguous, that shape and this dtype)."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_rows)
            if step != 1:
                raise ValueError(f"row slices must have step 1, got {rows!r}")
            rows = range(start, max(start, stop))
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        elif out.shape != (len(rows), *self.row_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {(len(rows), *self.row_shape)}, "
                             f"got {out.dtype} {out.shape}")
        self.files.map(lambda i_r: self.read_into(i_r[1], out[i_r[0]]), enumerate(rows.tolist()),
                       parallel=out[:1].nbytes >= PARALLEL_ROW_BYTES)
        return out

    def read_into(self, r: int, out: np.ndarray) -> None:
        """Row `r` into `out` (C-contiguous, row_shape, dtype)."""
        r = int(r)
        if not 0 <= r < self.n_rows:
            raise IndexError(f"row {r} out of range for {self.n_rows} rows")
        shard, chunk = divmod(r, self.rows_per_shard)
        path = self._paths.get(shard)
        if path is None:
            path = self._paths[shard] = os.path.join(self.folder, self._key_of(shard))
        try:
            if self.files.read(path, self.rows_per_shard, self.has_crc, chunk, out, self.chunk_crc, self.zstd):
                return
        except DamagedCacheError as exc:  # the row, so that the store names its sample
            raise DamagedCacheError(str(exc), rows=[r], detail=exc.detail) from None
        if self.chunk_crc:  # format 2 writes every chunk: absence is damage, not the fill value
            what = "chunk missing from its shard" if os.path.exists(path) else "chunk file missing"
            raise DamagedCacheError(f"{what} ({path})", rows=[r], detail=f"{what} ({path})", missing=True)
        out[...] = self.fill_value
