"""`FeatureDataset`: one noise level of a cache as a torch Dataset (one item per finished sample).

The store is opened lazily in each process that reads it: the dataset keeps the path, and a
DataLoader worker (forked or spawned) opens its own handles on first use. `preload=True` reads the
selected arrays into RAM once instead; `FeatureDataset.preload_bytes(...)` says how much that takes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from refseg.cache.batch_buffers import BatchBuffers
from refseg.cache.reader import Cache, open_cache
from refseg.core.errors import CacheError
from refseg.core.memory import available_memory

_PRELOAD_BLOCK_BYTES = 256 * 2**20  # read this much at a time while preloading


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class FeatureDataset(torch.utils.data.Dataset):
    """Items: {"features": {name: f16 (C,H,W)}, "gt": u8 (S,S), "text_embedding": f16 (L,D),
    "text_mask": bool (L,), "row": int}. `text=False` leaves out the two text entries."""

    def __init__(self, path, noise_t: int, names=None, rows=None, text: bool = True, preload: bool = False,
                 direct_reads: bool = True):
        self.path = os.fspath(path)
        self.direct_reads = bool(direct_reads)  # see cache.open_cache
        self.noise_t = int(noise_t)
        self.text = bool(text)
        cache = open_cache(self.path)  # used here only; each process opens its own on first read
        self.spec = cache.spec
        self.itemsize = cache.float_dtype.itemsize  # 2 (float16) or 4 (--cache-dtype fp32)
        self.fingerprint = cache.fingerprint
        self.names = self._check_names(cache, names)
        self.rows = self._select_rows(cache, self.noise_t, rows)
        self._cache: Cache | None = None
        self._buffers: BatchBuffers | None = None  # this process's batch arrays, reused once dropped
        self._pid: int | None = None
        self._data: dict[str, np.ndarray] | None = None
        if preload:
            self._data = self._preload(cache)

    # ---- selection ----------------------------------------------------------------------------
    @staticmethod
    def _check_names(cache: Cache, names) -> list[str]:
        if names is None:
            return list(cache.spec.names)
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in cache.spec]
        if missing:
            raise CacheError(f"tensor(s) {', '.join(missing)} not in cache {cache.path} "
                             f"(it has {', '.join(cache.spec.names)})")
        return names

    @staticmethod
    def _select_rows(cache: Cache, noise_t: int, rows) -> np.ndarray:
        done = cache.done(noise_t)
        if rows is None:
            selected = np.flatnonzero(done).astype(np.int64)
            if len(selected) == 0:
                raise CacheError(f"cache {cache.path} has no finished samples at T={noise_t} yet")
            return selected
        selected = np.asarray(rows, dtype=np.int64).reshape(-1)
        outside = selected[(selected < 0) | (selected >= cache.n_samples)]
        if len(outside):
            raise CacheError(f"rows {outside[:5].tolist()} are outside cache {cache.path} ({cache.n_samples} samples)")
        unfinished = selected[~done[selected]]
        if len(unfinished):
            raise CacheError(f"{len(unfinished)} selected rows have no features at T={noise_t} in cache "
                             f"{cache.path} yet (e.g. rows {unfinished[:5].tolist()})")
        return selected

    # ---- preload ------------------------------------------------------------------------------
    @staticmethod
    def row_bytes(spec, names, text: bool, itemsize: int) -> int:
        """RAM bytes of one preloaded sample: the tensors `names` (+ text) at `itemsize` bytes a value, GT as uint8."""
        n = sum(spec[name].nbytes(itemsize) for name in names) + spec.image_size**2  # features + gt u8
        if text:
            n += spec.token_length * spec.text_dim * itemsize + spec.token_length  # embedding + mask bool
        return n

    @classmethod
    def preload_bytes(cls, path, noise_t: int, names=None, rows=None, text: bool = True) -> int:
        """Bytes of RAM `FeatureDataset(path, noise_t, names, rows, text, preload=True)` needs."""
        cache = open_cache(os.fspath(path))
        names = cls._check_names(cache, names)
        n = len(cls._select_rows(cache, int(noise_t), rows))
        return n * cls.row_bytes(cache.spec, names, text, cache.float_dtype.itemsize)

    def nbytes(self) -> int:
        """Bytes of RAM this dataset's preloaded arrays take (or would take)."""
        return len(self.rows) * self.row_bytes(self.spec, self.names, self.text, self.itemsize)

    def _preload(self, cache: Cache) -> dict[str, np.ndarray]:
        need = self.nbytes()
        available = available_memory()
        if available is not None and need > available:
            raise CacheError(f"preloading {len(self.rows)} samples of {cache.path} needs {_gb(need)} of RAM "
                             f"but {_gb(available)} is available; read from disk instead (no preload) "
                             f"or select fewer rows/tensors")
        n = len(self.rows)
        sources = {name: (lambda r, name=name: cache.read_rows(self.noise_t, r, name)) for name in self.names}
        shapes = {name: self.spec[name].shape for name in self.names}
        sources["gt"], shapes["gt"] = cache.gt, (self.spec.image_size,) * 2
        if self.text:
            L, D = self.spec.token_length, self.spec.text_dim
            sources["text_embedding"], shapes["text_embedding"] = cache.embeddings, (L, D)
            sources["text_mask"], shapes["text_mask"] = cache.attention_mask, (L,)
        dtypes = {"gt": np.uint8, "text_mask": bool}
        data = {}
        block = max(cache.shard_size, _PRELOAD_BLOCK_BYTES // max(1, self.row_bytes(self.spec, self.names, self.text,
                                                                                       self.itemsize)))
        for key, read in sources.items():
            out = np.empty((n, *shapes[key]), dtype=dtypes.get(key, cache.float_dtype))
            for start in range(0, n, block):
                part = self.rows[start:start + block]
                contiguous = bool(np.all(np.diff(part) == 1))
                out[start:start + len(part)] = read(slice(int(part[0]), int(part[-1]) + 1) if contiguous else part)
            data[key] = out
        return data

    # ---- lazy, per-process store --------------------------------------------------------------
    def _open(self) -> Cache:
        if self._cache is None or self._pid != os.getpid():
            # a DataLoader worker reads one row at a time: the workers are the parallel readers then
            in_worker = torch.utils.data.get_worker_info() is not None
            self._cache = open_cache(self.path, direct_reads=self.direct_reads, read_threads=1 if in_worker else None)
            self._buffers = BatchBuffers(shared=in_worker)  # never the parent's: a forked copy is paged in anew
            self._pid = os.getpid()
        return self._cache

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = state["_buffers"] = None  # no zarr object travels to a worker; it opens its own
        state["_pid"] = None
        return state

    # ---- items --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        """One item: a batch of one, read as `__getitems__` reads batches (IndexError past the end)."""
        return self.__getitems__([int(i)])[0]

    def __getitems__(self, indices) -> "CollatedItems":
        """The items `indices`, read as one batch: each tensor's rows straight into one (n, ...) array.
        A DataLoader asks for this; refseg's (`heads.batches.make_loader`) takes the batch as read, any
        other stacks the items as usual. The same values as `self[i]` for each i."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.rows[positions]  # IndexError past the end, as for one item
        if self._data is not None:
            features = {name: self._data[name][positions] for name in self.names}
            gt = self._data["gt"][positions]
            if self.text:
                embedding, mask = self._data["text_embedding"][positions], self._data["text_mask"][positions]
            features = {name: torch.from_numpy(a) for name, a in features.items()}
        else:
            cache, buffers = self._open(), self._buffers
            features = {}
            for name in self.names:
                out, features[name] = buffers.take((len(rows), *self.spec[name].shape), cache.float_dtype)
                cache.read_rows(self.noise_t, rows, name, out=out)
            gt = cache.gt(rows)
            if self.text:
                embedding, mask = cache.embeddings(rows), cache.attention_mask(rows).astype(bool)
        batch = {"features": features, "gt": torch.from_numpy(gt), "row": torch.from_numpy(rows.copy())}
        if self.text:
            batch["text_embedding"] = torch.from_numpy(embedding)
            batch["text_mask"] = torch.from_numpy(mask)
        return CollatedItems(batch)

    def __repr__(self) -> str:
        return (f"FeatureDataset({self.path!r}, T={self.noise_t}, {len(self)} samples, names={self.names}"
                f"{', preloaded' if self._data is not None else ''})")


class CollatedItems(list):
    """One batch's items, each a view into the batch, with the batch itself as `.batch` (collated as
    torch's `default_collate` would): `default_collate` stacks the items like any list of items, and
    `refseg.heads.batches.collate_items` takes `.batch` without that copy of the whole batch (the training
    loader's reads from the page cache went from 15-22% to 37-41% of a sequential read: BENCHMARKS.md)."""

    def __init__(self, batch: dict):
        self.batch = batch
        super().__init__(_item_of(batch, k) for k in range(len(batch["row"])))


def _item_of(batch: dict, k: int) -> dict:
    item = {"features": {name: t[k] for name, t in batch["features"].items()}, "gt": batch["gt"][k],
            "row": int(batch["row"][k])}
    for key in ("text_embedding", "text_mask"):
        if key in batch:
            item[key] = batch[key][k]
    return item
