"""`Store`: what the reader (`Cache`) and the writer (`CacheWriter`) share about an opened store.

The root attributes are parsed here, once, into typed fields: format version, fingerprint, the
extraction record (the backbone, extraction and dataset dicts), spec, sample selection, shard size
and codec. Every one of them is written when the store is created (`CacheWriter._create`), so none
has a default. The sample index is read and the per-sample data arrays are opened once; noise groups
are looked up on demand.

Data is read through the store's engine (cache/engine.py) and named alike for the reader and the
writer (`latents`, `embeddings`, `pooled`, `attention_mask`, `input_ids`, `gt`). A chunk that is
missing or fails its checksum is a `DamagedCacheError` naming the store, the array and the samples
(sent_id, or image_id for per-image arrays), with the command that repairs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from refseg.cache.engine import ZarrEngine
from refseg.cache.layout import (DEFAULT_CACHE_DTYPE, FORMAT_ATTR, INDEX_FIELDS, PER_IMAGE, QUANTIZED_DTYPE,
                                 ROWS_ATTR, SETTINGS_KEYS, has_checksums, noise_group_name, parse_noise_group,
                                 storage_dtypes)
from refseg.core.errors import CacheError, DamagedCacheError
from refseg.core.feature_spec import FeatureSpec

# the arrays every store has, which a reader opens before anything else (text/pooled: some families only)
CORE_ARRAYS = (*(f"index/{name}" for name in INDEX_FIELDS), "index/text", "images/image_id", "images/orig_hw",
               "images/latent", "images/done", "text/input_ids", "text/attention_mask", "text/embedding",
               "text/done", "masks/gt")


def take_rows(arr: zarr.Array, rows) -> np.ndarray:
    """Rows of `arr` by int, slice, or a sequence of ints (any order, repeats allowed).

    A sequence is read as slices of consecutive rows: zarr's orthogonal selection over a list of
    rows is much slower than slices (bench/read.py; BENCHMARKS.md, findings).
    """
    if isinstance(rows, (slice, int, np.integer)):
        return arr[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    runs = [arr[int(run[0]):int(run[-1]) + 1] for run in np.split(unique, breaks)]
    return np.concatenate(runs)[inverse]


@dataclass(frozen=True)
class Coverage:
    """How much of one noise level is extracted.

    A sample that extraction recorded as bad (`--skip-bad`: flagged `skipped`, stored as zeros) is
    not missing: it will never be done. So coverage is `done / (samples - skipped)`, and a level is
    complete when every sample is either done or skipped.
    """

    noise_t: int
    samples: int  # rows in the store
    done: int
    skipped: int

    @classmethod
    def from_flags(cls, noise_t: int, done: np.ndarray, skipped: np.ndarray) -> "Coverage":
        done, skipped = np.asarray(done, bool), np.asarray(skipped, bool)
        return cls(int(noise_t), int(done.size), int(np.count_nonzero(done & ~skipped)), int(np.count_nonzero(skipped)))

    @property
    def expected(self) -> int:
        """The samples that can be done: all but the skipped ones."""
        return self.samples - self.skipped

    @property
    def missing(self) -> int:
        return self.expected - self.done

    @property
    def complete(self) -> bool:
        return self.missing == 0

    @property
    def fraction(self) -> float:
        return self.done / self.expected if self.expected else 1.0

    def describe(self) -> str:
        """"16 of 142 samples (11.3%)", with the skipped ones when there are any."""
        skipped = f"; {self.skipped} more skipped as bad" if self.skipped else ""
        return f"{self.done} of {self.expected} samples ({100 * self.fraction:.1f}%{skipped})"

    @classmethod
    def from_dict(cls, d: dict) -> "Coverage":
        """From `to_dict()`'s output (config.json, an evaluation's JSON)."""
        return cls(int(d["noise_t"]), int(d["samples"]), int(d["done"]), int(d["skipped"]))

    def to_dict(self) -> dict:
        return {"noise_t": self.noise_t, "samples": self.samples, "done": self.done, "skipped": self.skipped,
                "missing": self.missing, "fraction": self.fraction, "complete": self.complete}


class Store:
    """A refseg cache store on its opened root group (from `layout.open_root`)."""

    def __init__(self, path: str, root: zarr.Group):
        self.path = path
        self._root = root
        self.attrs: dict = root.attrs.asdict()
        self.format_version: int = int(self.attrs[FORMAT_ATTR])
        self.fingerprint: str = self.attrs["fingerprint"]
        # the backbone, extraction and dataset dicts the store was made with (`NewStore.extraction_record`)
        self.extraction_record: dict = {key: self.attrs[key] for key in SETTINGS_KEYS}
        self.spec = FeatureSpec.from_dict(self.attrs["spec"])
        self.sample_selection: dict = self.attrs["samples"]  # {"n", "sent_ids_sha256"} (cache/fingerprint.py)
        self.shard_size = int(self.attrs["shard_size"])
        self.codec: str = self.attrs["codec"]
        # latents, embeddings and features: float16 unless extracted with --cache-dtype fp32 (cache/layout.py)
        extraction = self.extraction_record["extraction"]
        feature_dtype, float_dtype = storage_dtypes(extraction.get("cache_dtype", DEFAULT_CACHE_DTYPE))
        self.float_dtype = np.dtype(float_dtype)  # what every float array reads as (int8 features: float16)
        self.feature_dtype = np.dtype(feature_dtype)  # what the features are stored as
        self.quantized = feature_dtype == QUANTIZED_DTYPE  # int8 codes + per-channel scales (cache/quantize.py)
        # format 2: a CRC-32C on every chunk, every chunk written (an absent one is damage)
        self.checksums = has_checksums(self.format_version)
        # reads through zarr-python, never tensorstore: a reader's process may fork DataLoader workers
        # (cache/engine.py says why)
        self.engine = ZarrEngine(path, self.checksums, root)
        missing = [key for key in CORE_ARRAYS if not _has_array(root, key)]
        if missing:
            raise DamagedCacheError(
                f"cache {path} is damaged: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no metadata "
                f"(zarr.json); run `refseg-cache verify {path} --repair` to rebuild it from the store's recorded "
                "layout", array=missing[0])
        self.index: dict[str, np.ndarray] = {name: self._read_whole(f"index/{name}") for name in INDEX_FIELDS}
        self.n_samples = len(self.index["sent_id"])
        self._latent = root["images/latent"]
        self.n_images = self._latent.shape[0]
        self._input_ids = root["text/input_ids"]
        self._attention_mask = root["text/attention_mask"]
        self._embedding = root["text/embedding"]
        # the pooled text embedding (SDXL, SD3, FLUX); None in stores of families without one
        self._pooled = root["text/pooled"] if "pooled" in root["text"] else None
        self._gt = root["masks/gt"]

    @property
    def noise_levels(self) -> list[int]:
        """The noise levels whose groups are finished (read now: a running extraction adds more)."""
        levels = []
        for name, group in self._root.groups():
            t = parse_noise_group(name)
            if t is not None and "noise_t" in group.attrs:
                levels.append(t)
        return sorted(levels)

    def per_image(self, t: int) -> bool:
        """Whether noise level `t` stores its features once per image (a `--prompt empty` store)."""
        known = self.__dict__.setdefault("_per_image_levels", {})
        if int(t) not in known:
            group = self._noise_group(t)
            if group is None:  # not (yet) a finished level: look again next time
                return False
            known[int(t)] = group.attrs.get(ROWS_ATTR) == PER_IMAGE  # fixed once the group is finished
        return known[int(t)]

    def _noise_group(self, t: int) -> zarr.Group | None:
        """The group of noise level `t`, or None while it does not exist or is unfinished."""
        try:
            name = noise_group_name(t)
        except ValueError as exc:  # a level no store can hold (T < 0 or T > 9999): the user's, not a bug
            raise CacheError(f"noise level T={t} is not valid ({exc})") from None
        if name not in self._root:
            return None
        group = self._root[name]
        # a noise group gets its attributes after its arrays (CacheWriter._finish_noise_level)
        return group if "noise_t" in group.attrs else None

    # ---- data, named alike for the reader and the writer -------------------------------------------
    def latents(self, image_rows) -> np.ndarray:
        """VAE latents of image rows (int, slice or sequence)."""
        return self._take(self._latent, image_rows)

    def embeddings(self, rows) -> np.ndarray:
        return self._take(self._embedding, rows)

    def pooled(self, rows) -> np.ndarray | None:
        """The pooled text embeddings of `rows` (SDXL, SD3, FLUX); None for a store without them."""
        return None if self._pooled is None else self._take(self._pooled, rows)

    def attention_mask(self, rows) -> np.ndarray:
        return self._take(self._attention_mask, rows)

    def input_ids(self, rows) -> np.ndarray:
        return self._take(self._input_ids, rows)

    def gt(self, rows) -> np.ndarray:
        return self._take(self._gt, rows)

    def flags(self, key: str) -> np.ndarray:
        """A done/skipped flag array ("text/done", "t0005/skipped"), read now. An absent flag file reads
        as False (not done: computed again, never trusted); one that fails its checksum is damage."""
        try:
            array = self._root[key]
        except KeyError:
            raise DamagedCacheError(f"cache {self.path} is damaged: {key} has no metadata (zarr.json); run "
                                    f"`refseg-cache verify {self.path} --repair`", array=key) from None
        try:
            return array[:]
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            raise DamagedCacheError(f"cache {self.path} is damaged: the flags {key} fail their checksum; run "
                                    f"`refseg-cache verify {self.path} --repair`", array=key) from None

    def take(self, array: zarr.Array, rows) -> np.ndarray:
        """Rows of any numeric array of this store, checked as every read is (what `export-h5` copies);
        done/skipped flags are read as `flags` reads them (an absent flag file is "not done")."""
        key = array_key(array)
        if key.rsplit("/", 1)[-1] in ("done", "skipped"):
            return self.flags(key)[rows]
        return self._take(array, rows)

    def _take(self, array: zarr.Array, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of one per-row array through the engine (into `out` when given: an array of their shape and
        dtype); damage is said with the samples' ids."""
        key = array_key(array)
        try:
            return self._read_rows(array, key, rows, out)
        except DamagedCacheError as exc:
            if not exc.missing:
                raise self.damage_error(exc.array or key, exc) from None
        # Some chunk is absent. Rows never written (not flagged finished) read as the fill value, as the
        # docs say; a finished row's absent chunk is damage. Read row by row to tell which (and name them all).
        wanted = np.arange(array.shape[0])[rows]
        finished = self._finished(key, wanted)
        if out is None:
            out = np.empty((*np.shape(wanted), *array.shape[1:]), dtype=array.dtype)
        out[...] = 0
        damaged, first_damage = [], None
        for i in np.flatnonzero(np.atleast_1d(finished)):
            r = int(np.atleast_1d(wanted)[i])
            try:
                out.reshape(-1, *array.shape[1:])[i] = self._read_rows(array, key, r)
            except DamagedCacheError as exc:
                damaged.append(r)
                first_damage = first_damage or exc
        if damaged:  # every damaged row read, named at once
            raise self.damage_error(key, DamagedCacheError(first_damage.detail, array=key, rows=damaged,
                                                           detail=first_damage.detail), rows_known=True) from None
        return out

    def _finished(self, key: str, rows) -> np.ndarray:
        """Whether each of `rows` of array `key` is flagged finished (so its chunk must exist)."""
        group = key.split("/")[0]
        if group == "index":
            return np.ones(np.shape(np.arange(self.n_samples)[rows]), dtype=bool)  # written when created
        flags = {"images": ["images/done"], "text": ["text/done"], "masks": ["text/done"]}.get(
            group, [f"{group}/done", f"{group}/skipped"])
        finished = np.logical_or.reduce([self.flags(f) for f in flags])
        return np.atleast_1d(finished[rows])

    def _read_rows(self, array: zarr.Array, key: str, rows, out: np.ndarray | None = None) -> np.ndarray:
        return into_array(out, self.engine.read_rows(key, rows))

    def _read_whole(self, key: str) -> np.ndarray:
        try:
            return self.engine.read(key, 0, self.engine.shape(key)[0])
        except DamagedCacheError as exc:
            raise self.damage_error(key, exc, rows_known=False) from None

    def damage_error(self, key: str, exc: DamagedCacheError, rows_known: bool = True) -> DamagedCacheError:
        """`exc` said in the user's terms: the store, the array, the samples, what to run."""
        rows = exc.rows
        if rows_known and len(rows) > 1:  # a read of several rows failed: find the damaged ones
            found = self.engine.damaged_rows(key, min(rows), max(rows) + 1)
            rows = sorted(found) or rows
        which = f" {self.describe_rows(key, rows)}" if rows_known and rows else ""
        return DamagedCacheError(
            f"cache {self.path} is damaged: {key}{which}: {exc.detail}; run `refseg-cache verify {self.path} "
            "--repair`, then the refseg-extract command that made the store, to recompute what is damaged",
            array=key, rows=rows, detail=exc.detail)

    def describe_rows(self, key: str, rows) -> str:
        """"sent_id 12, 15" / "image_id 3" for rows of array `key` (at most 10 ids named)."""
        rows = sorted(int(r) for r in rows)
        level = parse_noise_group(key.split("/")[0])
        per_image = key.startswith("images/") or (level is not None and self.per_image(level))
        ids = (self._image_ids() if per_image else self.index["sent_id"])[rows]
        shown = ", ".join(str(int(i)) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
        noun = "image_id" if per_image else "sent_id"
        return f"{'row' if len(rows) == 1 else 'rows'} {rows[0] if len(rows) == 1 else f'{rows[0]}..{rows[-1]}'} ({noun} {shown})"

    def _image_ids(self) -> np.ndarray:
        if not hasattr(self, "_image_id_column"):
            self._image_id_column = self._read_whole("images/image_id")
        return self._image_id_column


def array_key(array: zarr.Array) -> str:
    """An opened array's path inside its store ("t0005/s8")."""
    return array.store_path.path


def _has_array(root: zarr.Group, key: str) -> bool:
    try:
        return isinstance(root[key], zarr.Array)
    except KeyError:
        return False


def into_array(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """`values`, or `out` holding them when an output array was given."""
    if out is None:
        return values
    out[...] = values
    return out
