"""`CacheWriter`: create or resume a store (what it decides at opening: cache/opening.py) and fill it
one whole shard at a time.

Stage 1 stores what every noise level shares: per image the VAE latent (`images/`), per sentence
the tokens, text embedding and ground-truth mask (`text/`, `masks/`). Stage 2 stores, per noise
level, the UNet features and attention maps (`tNNNN/`). In every stage a writer writes a whole
shard's data and then its `done` flags, so a crash loses at most the shard being written and a
reader never sees half a sample. Shards are split between writer processes by `part=(i, n)`.

Several processes may write one local store at once (cache/lock.py): creating it, adding a noise
level and recording bad samples happen under the store's metadata lock, and a process claims a shard
(`claim_shards`) before computing it, so two processes never write the same shard. Every file is
written by zarr to a temporary name and renamed into place; the temporary files of a writer that was
killed are removed by the next writer that finds itself alone with the store.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import zarr

from refseg.cache.engine import open_engine
from refseg.cache.fingerprint import compute_fingerprint, dataset_changed
from refseg.cache.layout import (
    CREATING_ATTR,
    DEFAULT_CACHE_DTYPE,
    FORMAT_ATTR,
    FORMAT_VERSION,
    INDEX_FIELDS,
    PER_IMAGE,
    ROWS_ATTR,
    base_arrays,
    create_array,
    create_flags,
    is_local,
    noise_arrays,
    noise_group_name,
    open_root,
    storage_dtypes,
)
from refseg.cache.lock import StoreLock
from refseg.cache.opening import (
    NewStore,
    made_by_another_process,
    open_or_replace,
    refuse_what_is_not_a_cache,
    remove_stale_partial_files,
    restore_tables,
)
from refseg.cache.quantize import quantize, scale_name
from refseg.cache.stage_store import StageStore
from refseg.cache.store import Store
from refseg.core.errors import CacheError, CacheMismatchError, NonFiniteError


def sorted_json(obj):
    """`obj` with every dict's keys in sorted order: zarr writes attributes in insertion order, and
    the same store must be the same bytes however it was written."""
    if isinstance(obj, dict):
        return {k: sorted_json(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [sorted_json(v) for v in obj]
    return obj


def shard_slices(n: int, shard_size: int, part: tuple[int, int] = (0, 1)) -> list[slice]:
    """The shards of `n` rows that belong to `part` = (i, count): shard j iff j % count == i."""
    i, count = (int(p) for p in part)
    if count < 1 or not 0 <= i < count:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    return [slice(start, min(start + shard_size, n))
            for j, start in enumerate(range(0, n, shard_size)) if j % count == i]


class CacheWriter(Store):
    """Writes one cache store. Use `CacheWriter.open(...)`; the constructor takes an opened root group."""

    def __init__(self, path: str, root: zarr.Group, lock: StoreLock | None = None, engine: str = "tensorstore"):
        super().__init__(path, root)
        self._lock = lock  # None for a remote (fsspec) store: no inter-process locks there
        self.image_ids = self._read_whole("images/image_id")
        self._writes = open_engine(path, root, self.checksums, engine)  # tensorstore for a local store
        self._levels: dict[int, str] = {}  # noise level -> its group's name, once known to exist
        # True when resumed although the dataset's files changed since the store was made: allowed only
        # once stage 1 is complete, since stage 2 reads the store's own latents and embeddings alone
        self.dataset_changed = False

    # ---- open / create ------------------------------------------------------------------------
    @classmethod
    def open(cls, path, store: NewStore, *, overwrite: bool = False, engine: str = "tensorstore") -> "CacheWriter":
        """Create `store` at `path`, or resume the store there if it has the same fingerprint.

        `overwrite` replaces a store with another fingerprint (cache/opening.py `open_or_replace`).
        `engine`: what writes the data of a local store, "tensorstore" (the default) or "zarr-python"
        (the same bytes' values: tests/test_engine.py; bench/write.py compares speeds).
        """
        path = os.fspath(path)
        store.check()
        payload = store.fingerprint_payload()
        fingerprint = compute_fingerprint(payload)
        if is_local(path):
            refuse_what_is_not_a_cache(path)  # before a lock file is made next to someone's photos
        lock = StoreLock(path) if is_local(path) else None
        try:
            with lock.metadata() if lock else contextlib.nullcontext():
                alone = lock.join() if lock else True
                root = open_or_replace(path, payload, fingerprint, overwrite, alone, store.dataset_sha256)
                if root is None:
                    cls._create(path, store, payload, fingerprint)
                    root = open_root(path, mode="r+")
                else:
                    restore_tables(path, root, store.samples, store.images)
                    if alone and lock:
                        remove_stale_partial_files(path)
            writer = cls(path, root, lock, engine)
            writer.dataset_changed = dataset_changed(root.attrs.asdict(), store.dataset_sha256)
            return writer
        except BaseException:
            if lock:
                lock.close()
            raise

    @staticmethod
    def _create(path: str, store: NewStore, payload: dict, fingerprint: str) -> None:
        """Write a new store: its groups, arrays and tables, then its attributes (from then on it is a cache)."""
        shard_size = int(store.shard_size)
        root = zarr.open_group(path, mode="w", attributes={CREATING_ATTR: FORMAT_VERSION})
        for name in ("index", "images", "text", "masks"):
            root.create_group(name)
        arrays = {}
        # the latents' and embeddings' type, as Store.float_dtype reads it (int8 stores: float16)
        float_dtype = storage_dtypes(payload["extraction"].get("cache_dtype", DEFAULT_CACHE_DTYPE))[1]
        samples, images = store.samples, store.images
        for layout in base_arrays(store.spec, len(samples), len(images), float_dtype, **store.text_layout,
                                  format_version=FORMAT_VERSION):
            group, name = layout.path.split("/")
            arrays[layout.path] = create_array(root[group], layout, name, shard_size, store.codec)
        create_flags(root["images"], "done", len(images), shard_size, dim="image")
        create_flags(root["text"], "done", len(samples), shard_size)
        for name in INDEX_FIELDS:
            arrays[f"index/{name}"][:] = getattr(samples, name)
        arrays["index/text"][:] = np.array(samples.text, dtype=object)
        arrays["images/image_id"][:] = images.image_id
        arrays["images/orig_hw"][:] = images.orig_hw
        attrs = dict(payload, fingerprint=fingerprint, shard_size=shard_size, codec=store.codec, **store.layout_attrs())
        attrs[FORMAT_ATTR] = FORMAT_VERSION
        root.attrs.put(sorted_json(attrs))  # last: from here on the store counts as a cache

    # ---- shared checks ------------------------------------------------------------------------
    def _check_shard(self, rows, n: int, what: str) -> int:
        """Rows must be exactly one whole shard; returns its length."""
        if not isinstance(rows, slice) or rows.step not in (None, 1) or rows.start is None or rows.stop is None:
            raise ValueError(f"{what}: rows must be a shard slice like slice(0, {self.shard_size}), got {rows!r}")
        start, stop = rows.start, rows.stop
        if start % self.shard_size or not 0 <= start < n or stop != min(start + self.shard_size, n):
            raise ValueError(f"{what}: rows {start}:{stop} are not one whole shard (shard size "
                             f"{self.shard_size}, {n} rows); write whole shards from *_shards_todo()")
        return stop - start

    @staticmethod
    def _as(array, dtype, shape, what: str) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != tuple(shape):
            raise ValueError(f"{what}: expected shape {tuple(shape)}, got {array.shape}")
        with np.errstate(over="ignore"):  # a value too big for the store's type becomes inf, which is then refused
            return array.astype(dtype, copy=False)

    def _check_finite(self, arrays: dict[str, np.ndarray], ids: np.ndarray, id_name: str, where: str,
                      ignore: np.ndarray | None = None) -> None:
        """Raise NonFiniteError naming every row (by id) and tensor holding a NaN/inf; nothing is written."""
        bad: dict[int, list[str]] = {}
        for name, array in arrays.items():
            finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
            if ignore is not None:
                finite |= ignore
            for r in np.flatnonzero(~finite):
                bad.setdefault(int(r), []).append(name)
        if bad:
            listed = "; ".join(f"{id_name} {int(ids[r])} ({', '.join(names)})" for r, names in sorted(bad.items()))
            raise NonFiniteError(f"non-finite values (NaN/inf in {next(iter(arrays.values())).dtype}) {where}: {listed}; "
                                 f"nothing of this shard was written to {self.path}")

    def _write_shard(self, rows: slice, data: dict[str, np.ndarray], flags: dict[str, np.ndarray]) -> None:
        """Write one shard: the data of every array (`data`: array path -> the shard's rows) in flight at
        once through the engine, then, once every write has completed, the `flags` ("text/done", ...)."""
        pending = [self._writes.write(key, rows.start, array) for key, array in data.items()]
        errors = []
        for write in pending:  # wait for all, even after a failure: nothing of this shard is still in flight
            try:
                write.result()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        # invariant: a flag says "done" only for data that is completely on disk (a reader trusts it)
        for key, value in flags.items():
            self._root[key][rows] = value

    # ---- stage 1: per image --------------------------------------------------------------------
    def image_shards_todo(self, part: tuple[int, int] = (0, 1)) -> list[slice]:
        done = self.flags("images/done")
        return [s for s in shard_slices(self.n_images, self.shard_size, part) if not done[s].all()]

    def write_latents(self, rows: slice, latent: np.ndarray) -> None:
        n = self._check_shard(rows, self.n_images, "write_latents")
        spec = self.spec
        latent = self._as(latent, self.float_dtype, (n, spec.latent_channels, spec.latent_size, spec.latent_size), "latent")
        self._check_finite({"latent": latent}, self.image_ids[rows], "image_id", "in the VAE latent")
        self._write_shard(rows, {"images/latent": latent}, {"images/done": np.ones(n, dtype=bool)})

    # ---- stage 1: per sentence -----------------------------------------------------------------
    def text_shards_todo(self, part: tuple[int, int] = (0, 1)) -> list[slice]:
        done = self.flags("text/done")
        return [s for s in shard_slices(self.n_samples, self.shard_size, part) if not done[s].all()]

    def write_text(self, rows: slice, input_ids, attention_mask, embedding, gt, pooled=None) -> None:
        """One shard of sentences; `pooled` exactly when the store has text/pooled (SDXL, SD3, FLUX)."""
        n = self._check_shard(rows, self.n_samples, "write_text")
        spec = self.spec
        L, S = spec.token_length, spec.image_size
        context = tuple(self._embedding.shape[1:])  # (L, D); longer for families whose context is (SD3)
        if (pooled is None) != (self._pooled is None):
            raise ValueError("write_text: pass `pooled` exactly when the store has text/pooled "
                             f"({'it has' if self._pooled is not None else 'it has none'})")
        input_ids = self._as(input_ids, np.int32, (n, L), "input_ids")
        attention_mask = self._as(attention_mask, np.uint8, (n, L), "attention_mask")
        embedding = self._as(embedding, self.float_dtype, (n, *context), "embedding")
        if pooled is not None:
            pooled = self._as(pooled, self.float_dtype, (n, *self._pooled.shape[1:]), "pooled")
        gt = self._as(gt, np.uint8, (n, S, S), "gt")
        text = {"embedding": embedding} if pooled is None else {"embedding": embedding, "pooled": pooled}
        self._check_finite(text, self.index["sent_id"][rows], "sent_id", "in the text embedding")
        data = {"text/input_ids": input_ids, "text/attention_mask": attention_mask, "text/embedding": embedding,
                "masks/gt": gt, **({} if pooled is None else {"text/pooled": pooled})}
        self._write_shard(rows, data, {"text/done": np.ones(n, dtype=bool)})

    # ---- stage 2: per noise level ---------------------------------------------------------------
    def add_noise_level(self, t: int, timestep=None, noise=None) -> None:
        """Create group tNNNN for noise level `t` (the model run at `timestep`); a no-op if it exists.

        `noise` (a `refseg.core.noise.NoiseInput`, whose `level` is `t`): its ᾱ or σ, SNR, model timestep
        and kind are recorded as the group's attributes (DESIGN §5); without it only noise_t and timestep.
        A group that holds another noise level (another timestep, or another σ) is refused.
        """
        t = int(t)
        if noise is not None:
            timestep = noise.model_timestep
        elif timestep is None:
            raise ValueError("add_noise_level needs a timestep or a NoiseInput")
        else:
            timestep = int(timestep)
        name = noise_group_name(t)
        with self._metadata():
            root = self._fresh_root()
            with made_by_another_process():  # an object store has no lock: another writer may create it first
                group = root[name] if name in root else root.create_group(name)
            group = root[name]
            self._finish_noise_level(group, t, timestep, noise)
        self._levels.pop(t, None)

    def _finish_noise_level(self, group: zarr.Group, t: int, timestep, noise=None) -> None:
        attrs = group.attrs.asdict()
        same = noise.same_level(attrs) if noise is not None else attrs.get("timestep") == timestep
        if "timestep" in attrs and not same:
            was = f"timestep {attrs['timestep']}" + (f", σ {attrs['sigma']}" if "sigma" in attrs else "")
            now = f"timestep {timestep}" + (f", σ {noise.sigma}" if noise is not None and noise.sigma is not None else "")
            raise CacheMismatchError(
                f"cache {self.path} has noise level T={t} extracted with {was}, "
                f"but this run asks for {now} (use --overwrite to replace it)")
        # arrays first, attributes last: a group without attributes is an unfinished one, finished here
        members = set(group.array_keys())
        per_image = attrs.get(ROWS_ATTR) == PER_IMAGE if attrs else self._features_per_image()
        n_rows, dim = (self.n_images, "image") if per_image else (self.n_samples, "sample")
        for layout in noise_arrays(self.spec, n_rows, self.feature_dtype.name, dim):
            if layout.path not in members:  # in the store's own format: a format-1 store stays format 1
                with made_by_another_process():
                    create_array(group, layout, layout.path, self.shard_size, self.codec, self.checksums)
        for flag in ("done", "skipped"):
            if flag not in members:
                with made_by_another_process():
                    create_flags(group, flag, n_rows, self.shard_size, dim=dim, checksums=self.checksums)
        if not attrs:
            level = noise.to_attrs() if noise is not None else {"noise_t": t, "timestep": timestep}
            group.attrs.put(sorted_json({**level, **({ROWS_ATTR: PER_IMAGE} if per_image else {})}))

    def _features_per_image(self) -> bool:
        """Whether a new noise level stores its features once per image: with `--prompt empty` every
        sentence of an image has the same condition and ε, so the same features (a store of format 2 or
        later; a format-1 store keeps a row per sample)."""
        return self.checksums and self.extraction_record["extraction"].get("prompt") == "empty"

    def level_rows(self, t: int) -> int:
        """Rows of noise level `t`'s arrays: one per image in a per-image group, else one per sample."""
        return self.n_images if self.per_image(t) else self.n_samples

    def _level(self, t: int) -> str:
        """The group name of noise level `t`, which must have been added."""
        t = int(t)
        if t not in self._levels:
            if self._noise_group(t) is None:
                raise CacheError(f"noise level T={t} was not added to cache {self.path} (call add_noise_level)")
            self._levels[t] = noise_group_name(t)
        return self._levels[t]

    def done(self, t: int) -> np.ndarray:
        return self.flags(f"{self._level(t)}/done")

    def feature_shards_todo(self, t: int, part: tuple[int, int] = (0, 1)) -> list[slice]:
        group = self._level(t)
        finished = self.flags(f"{group}/done") | self.flags(f"{group}/skipped")
        return [s for s in shard_slices(self.level_rows(t), self.shard_size, part) if not finished[s].all()]

    def write_features(self, t: int, rows: slice, arrays: dict[str, np.ndarray], skipped: np.ndarray | None = None,
                       checked: bool = False):
        """Write one shard of features for noise level `t` (image rows in a per-image level); rows marked
        `skipped` are stored as zeros.

        `checked`: the caller has already refused non-finite values (the pipeline does, on the device:
        extract/checks.py `check_features`), so the host need not read every value again.
        """
        group = self._level(t)
        n = self._check_shard(rows, self.level_rows(t), "write_features")
        names = set(arrays)
        if names != set(self.spec.names):
            raise ValueError(f"write_features: expected tensors {sorted(self.spec.names)}, got {sorted(names)}")
        skipped = np.zeros(n, dtype=bool) if skipped is None else self._as(skipped, bool, (n,), "skipped")
        data = {t_.name: self._as(arrays[t_.name], self.float_dtype, (n, *t_.shape), t_.name) for t_ in self.spec.tensors}
        if not checked:
            ids, id_name = (self.image_ids, "image_id") if self.per_image(t) else (self.index["sent_id"], "sent_id")
            self._check_finite(data, ids[rows], id_name, f"in features at T={int(t)}", ignore=skipped)
        if skipped.any():  # whatever a skipped row held (often the NaN that got it skipped), store zeros
            keep = ~skipped.reshape(-1, 1, 1, 1)
            data = {name: np.where(keep, array, array.dtype.type(0)) for name, array in data.items()}
        if self.quantized:  # int8 codes + per-channel scales (cache/quantize.py); a zero row keeps scale 0
            data = {key: value for name, array in data.items()
                    for key, value in zip((name, scale_name(name)), quantize(array))}
        self._write_shard(rows, {f"{group}/{name}": array for name, array in data.items()},
                          {f"{group}/skipped": skipped, f"{group}/done": ~skipped})

    # ---- report ---------------------------------------------------------------------------------
    def record_bad(self, sent_ids, reason) -> None:
        """Note samples that could not be extracted (root attribute "bad", sorted, for the report).

        `reason` is one string for all of them, or one string per sent_id.
        """
        sent_ids = [int(s) for s in np.atleast_1d(np.asarray(sent_ids))]
        reasons = [reason] * len(sent_ids) if isinstance(reason, str) else [str(r) for r in reason]
        if len(reasons) != len(sent_ids):
            raise ValueError(f"record_bad: {len(sent_ids)} sent_ids but {len(reasons)} reasons")
        with self._metadata():  # a read-modify-write of the root attributes, which other writers share
            root = self._fresh_root()
            attrs = root.attrs.asdict()
            entries = {(int(e["sent_id"]), str(e["reason"])) for e in attrs.get("bad", [])}
            entries |= set(zip(sent_ids, reasons))
            attrs["bad"] = [{"sent_id": s, "reason": r} for s, r in sorted(entries)]
            root.attrs.put(sorted_json(attrs))

    @property
    def bad(self) -> list[dict]:
        """What record_bad() recorded, by this process or another, in this run or an earlier one."""
        return list(self._fresh_root().attrs.asdict().get("bad", []))

    def bad_rows(self) -> np.ndarray:
        """The rows (sorted) of the samples recorded as bad."""
        bad_ids = np.array(sorted({e["sent_id"] for e in self.bad}), dtype=np.int64)
        return np.flatnonzero(np.isin(self.index["sent_id"], bad_ids))

    def stage(self, key, finite_checked: bool = False) -> StageStore:
        """The handle of stage `key` ("images", "text" or a noise level T, which must have been added)."""
        if key not in ("images", "text"):
            self._level(key)
        return StageStore(self, key, finite_checked)

    # ---- several writers ------------------------------------------------------------------------
    @property
    def has_locks(self) -> bool:
        """Whether other processes' claims are visible (a local store); remote stores have no locks."""
        return self._lock is not None

    def _metadata(self):
        return self._lock.metadata() if self._lock else contextlib.nullcontext()

    def _fresh_root(self) -> zarr.Group:
        """The root group read again from the store: other processes may have changed its metadata."""
        return zarr.open_group(self._root.store_path, mode="r+")

    def _finished(self, stage) -> np.ndarray:
        if stage in ("images", "text"):
            return self.flags(f"{stage}/done")
        group = self._level(stage)
        return self.flags(f"{group}/done") | self.flags(f"{group}/skipped")

    def claim_shards(self, stage, shards: list[slice]) -> tuple[list[slice], list[slice]]:
        """Claim `shards` of `stage` ("images", "text" or a noise level T) for this process.

        Returns (claimed, held by another process). A claimed shard that turns out to be finished
        already (another process wrote it meanwhile) is released and left out of both lists. Claims
        last until `release_shards`, `close`, or the end of the process.
        """
        if self._lock is None:
            return list(shards), []
        mine, others = [], []
        for s in shards:
            (mine if self._lock.claim(stage, s.start // self.shard_size) else others).append(s)
        finished = self._finished(stage)
        for s in [s for s in mine if finished[s].all()]:
            self._lock.release(stage, s.start // self.shard_size)
            mine.remove(s)
        return mine, others

    def release_shards(self, stage, shards: list[slice]) -> None:
        if self._lock is not None:
            for s in shards:
                self._lock.release(stage, s.start // self.shard_size)

    def close(self) -> None:
        """Release this writer's locks (its claims, and its presence as a writer of the store)."""
        if self._lock is not None:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"CacheWriter({self.path!r}, {self.n_samples} samples, {self.n_images} images, shard {self.shard_size})"
