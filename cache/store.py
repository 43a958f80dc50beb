"""`Store`: what the reader (`Cache`) and the writer (`CacheWriter`) share about an opened store.

The root attributes are parsed here, once, into typed fields: format version, fingerprint, the three
settings dicts, spec, sample selection, shard size and codec. Every one of them is written when the
store is created (`CacheWriter._create`, FORMAT_VERSION 1), so none has a default. The sample index
is read and the per-sample data arrays are opened once; noise groups are looked up on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from refseg.cache.layout import (DEFAULT_CACHE_DTYPE, FORMAT_ATTR, INDEX_FIELDS, SETTINGS_KEYS, noise_group_name,
                                 parse_noise_group)
from refseg.core.errors import CacheError
from refseg.core.feature_spec import FeatureSpec


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
        self.settings: dict = {key: self.attrs[key] for key in SETTINGS_KEYS}
        self.spec = FeatureSpec.from_dict(self.attrs["spec"])
        self.sample_selection: dict = self.attrs["samples"]  # {"n", "sent_ids_sha256"} (cache/fingerprint.py)
        self.shard_size = int(self.attrs["shard_size"])
        self.codec: str = self.attrs["codec"]
        # latents, embeddings and features: float16 unless extracted with --cache-dtype fp32 (cache/layout.py)
        self.float_dtype = np.dtype(self.settings["extraction"].get("cache_dtype", DEFAULT_CACHE_DTYPE))
        self.index: dict[str, np.ndarray] = {name: root[f"index/{name}"][:] for name in INDEX_FIELDS}
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

    def _take(self, array: zarr.Array, rows) -> np.ndarray:
        return take_rows(array, rows)
