"""`open_cache(path)` -> `Cache`: read-only access to a store, sample by sample or in blocks."""

from __future__ import annotations

import json
import os

import numpy as np
import zarr

from refseg.cache.fastread import ShardFiles, ShardRowReader
from refseg.cache.quantize import dequantize, scale_name
from refseg.cache.layout import COMPRESSED_MASKS_FORMAT, SETTINGS_KEYS, is_local, local_path, noise_group_name, open_root, store_nbytes
from refseg.cache.store import Coverage, Store, into_array
from refseg.core.errors import CacheError, DamagedCacheError


def open_cache(path, direct_reads: bool = True, read_threads: int | None = None) -> "Cache":
    """Open the store at `path` read-only. CacheError if it is missing, not a refseg cache, or newer.

    `direct_reads`: read rows of local uncompressed arrays straight from their shard files
    (cache/fastread.py; the same values and the same checks, faster than the engine one row at a
    time: BENCHMARKS.md, "Cache reads"); False reads everything through the engine (cache/engine.py).
    `read_threads`: how many rows those direct reads fetch at once (default: fastread.DEFAULT_READ_THREADS).
    """
    path = os.fspath(path)
    _refuse_what_is_not_a_store(path)
    return Cache(path, open_root(path, mode="r"), direct_reads=direct_reads, read_threads=read_threads)


def _refuse_what_is_not_a_store(path: str) -> None:
    """A CacheError naming what a local `path` is when it is a refseg file or folder other than a
    store (a run, a dataset, a file inside a store): the usual mix-ups of `--cache`. Anything else
    is left to `open_root`, which says what it found."""
    if not is_local(path):
        return
    p = local_path(path)
    name = os.path.basename(os.path.normpath(p))
    if os.path.isfile(p):
        if name == "zarr.json":
            raise CacheError(f"{path} is a file (Zarr metadata inside a store), not a cache: pass the store's "
                             f"folder, e.g. {os.path.dirname(os.path.abspath(p))}")
        if name in ("config.json", "metrics.jsonl") or name.endswith(".safetensors"):
            raise CacheError(f"{path} is a file of a head run directory, not a cache")
        if name.endswith((".h5", ".hdf5")):
            raise CacheError(f"{path} is a file (an HDF5 export?), not a cache: refseg reads Zarr store folders")
        return
    if os.path.isdir(p) and not os.path.exists(os.path.join(p, "zarr.json")):
        entries = os.listdir(p)
        if "config.json" in entries and _is_run_config(os.path.join(p, "config.json")):
            raise CacheError(f"{path} is a head run directory (written by refseg-train-head), not a cache")
        if "instances.json" in entries or any(e.startswith("refs(") and e.endswith(").p") for e in entries):
            raise CacheError(f"{path} is a dataset folder, not a cache: refseg-extract makes a cache from it")


def _is_run_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "head" in config and "noise_t" in config


class Cache(Store):
    """A refseg cache store opened for reading. Arrays are opened once and read on demand."""

    def __init__(self, path: str, root: zarr.Group, direct_reads: bool = True, read_threads: int | None = None):
        super().__init__(path, root)
        self._texts: list[str] | None = None
        self._levels: dict[int, zarr.Group] = {}
        self._level_arrays: dict[tuple[int, str], zarr.Array] = {}
        self._shard_files = ShardFiles(threads=read_threads) if direct_reads else None
        self._row_readers: dict[str, ShardRowReader | None] = {}  # by array key ("t0005/s8")

    # ---- what is in it ------------------------------------------------------------------------
    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            array = self._root["index/text"]  # a string array: zarr-python's (the engine has no strings)
            if self.checksums and array.nchunks_initialized < array.nchunks:  # format 2 writes every chunk
                raise self.damage_error("index/text", DamagedCacheError("chunk file missing"), rows_known=False)
            try:
                self._texts = [str(s) for s in array[:]]
            except ValueError as exc:
                if "checksum" not in str(exc):
                    raise
                raise self.damage_error("index/text", DamagedCacheError("checksum mismatch"), rows_known=False) from None
        return self._texts

    def _level(self, t) -> zarr.Group:
        t = int(t)
        if t not in self._levels:
            group = self._noise_group(t)
            if group is None:
                levels = self.noise_levels
                have = f"it has T={', '.join(map(str, levels))}" if levels else "it has no noise levels yet"
                raise CacheError(f"noise level T={t} is not in cache {self.path} ({have})")
            self._levels.setdefault(t, group)
        return self._levels[t]

    def _array(self, t: int, name: str) -> zarr.Array:
        key = (int(t), name)
        if key not in self._level_arrays:
            group = self._level(t)
            if name not in group:
                own = (*self.spec.names, *(scale_name(n) for n in self.spec.names if self.quantized), "done", "skipped")
                if name in own:  # the store's own array lost its zarr.json
                    key = f"{noise_group_name(t)}/{name}"
                    raise DamagedCacheError(f"cache {self.path} is damaged: {key} has no metadata (zarr.json); run "
                                            f"`refseg-cache verify {self.path} --repair`", array=key)
                raise CacheError(f"tensor {name!r} is not in cache {self.path} (it has {', '.join(self.spec.names)})")
            self._level_arrays.setdefault(key, group[name])  # two threads opening it keep the same one
        return self._level_arrays[key]

    def timestep(self, t) -> int | float:
        """The exact timestep the denoiser was given at noise level `t` (an int for UNets; SD3/FLUX: σ-based)."""
        value = self._level(t).attrs["timestep"]
        return int(value) if float(value).is_integer() else float(value)

    def noise(self, t) -> dict:
        """Noise level `t` as run: kind ("ddpm" | "flow"), alpha_bar or sigma, snr (None: infinite, no
        noise), model_timestep, given ("t" | "sigma"). For a group that records only noise_t and timestep
        they are computed from the store's scheduler settings (refseg_core/noise.py `recorded_noise`)."""
        from refseg.core.noise import recorded_noise  # deferred: refseg.core.noise imports torch

        return recorded_noise(self._level(t).attrs.asdict(), self.extraction_record["backbone"])

    def done(self, t) -> np.ndarray:
        """Which samples have features at noise level `t` (read now: a running extraction adds more)."""
        self._level(t)  # a CacheError naming the levels there are, if `t` is not one of them
        done = self.flags(f"{noise_group_name(t)}/done")
        if not self.per_image(t):
            return done
        return done[self.index["image_row"]] & ~self._bad_samples()  # a bad sentence of a good image: skipped

    def skipped(self, t) -> np.ndarray:
        """Samples recorded as bad at noise level `t` (stored as zeros, never done)."""
        self._level(t)
        skipped = self.flags(f"{noise_group_name(t)}/skipped")
        if not self.per_image(t):
            return skipped
        return skipped[self.index["image_row"]] | self._bad_samples()

    def _bad_samples(self) -> np.ndarray:
        """Which samples were recorded as bad (root attribute `bad`)."""
        return np.isin(self.index["sent_id"], [int(b["sent_id"]) for b in self.bad])

    def _level_rows(self, t, rows):
        """Sample rows as rows of noise level `t`'s arrays: their images' rows in a per-image level."""
        if not self.per_image(t):
            return rows
        return self.index["image_row"][rows] if not isinstance(rows, (int, np.integer)) else int(self.index["image_row"][rows])

    def coverage(self, t) -> Coverage:
        """How much of noise level `t` is extracted (read now: a running extraction adds more)."""
        return Coverage.from_flags(int(t), self.done(t), self.skipped(t))

    def images_done(self) -> np.ndarray:
        return self.flags("images/done")

    def text_done(self) -> np.ndarray:
        return self.flags("text/done")

    # ---- data ---------------------------------------------------------------------------------
    def _read_rows(self, array: zarr.Array, key: str, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows read directly from the shard files when the array allows it, else through the engine;
        into `out` when given."""
        reader = None
        if self._shard_files is not None:
            # by the array's key, not id(array): under threads a zarr.Array made twice is dropped once, and
            # its id may then name another array
            if key not in self._row_readers:
                self._row_readers.setdefault(key, ShardRowReader.for_array(array, self._shard_files))
            reader = self._row_readers[key]
        if reader is None or (isinstance(rows, slice) and rows.step not in (None, 1)):
            return into_array(out, self.engine.read_rows(key, rows))
        if isinstance(rows, (int, np.integer)):
            return into_array(out, reader.row(rows))
        return reader.rows(rows, out)

    def read(self, t, row: int, names=None) -> dict[str, np.ndarray]:
        """One sample's tensors at noise level `t` (float16, (C,H,W) each). Rows not done read as zeros."""
        row = int(row)
        if not 0 <= row < self.n_samples:
            raise IndexError(f"row {row} out of range for {self.n_samples} samples")
        names = self.spec.names if names is None else names
        return {name: self._tensor(t, name, row) for name in names}

    def read_rows(self, t, rows, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor for several rows: (n, C, H, W) float16 (float32 in a --cache-dtype fp32 store); read
        into `out` when given (C-contiguous, that shape and dtype: what FeatureDataset reuses, batch_buffers.py)."""
        return self._tensor(t, name, rows, out)

    def _tensor(self, t, name: str, rows, out: np.ndarray | None = None) -> np.ndarray:
        rows = self._level_rows(t, rows)
        if not self.quantized:
            return self._take(self._array(t, name), rows, out)
        # int8 codes times their per-channel scales, in float16 (cache/quantize.py)
        codes = self._take(self._array(t, name), rows)
        return dequantize(codes, self._take(self._array(t, scale_name(name)), rows), self.float_dtype, out=out)

    @property
    def bad(self) -> list[dict]:
        """Samples recorded as bad by the writer: [{"sent_id", "reason"}]."""
        return list(self.attrs.get("bad", []))

    # ---- report -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the store takes on disk."""
        return store_nbytes(self.path)

    def describe(self) -> str:
        """What `refseg-cache info` prints."""
        spec = self.spec
        lines = [
            f"refseg cache {self.path}",
            f"  format {self.format_version}, fingerprint {self.fingerprint}, shard size {self.shard_size}, "
            f"codec {self.codec}",
            "  checksums: " + ("CRC-32C on every chunk (format 2 and later)" if self.checksums else
                               "none on the data, only on shard indexes (format 1: a lost chunk reads as zeros; "
                               "extract again to get checksums)"),
            "  GT masks: " + ("zstd-compressed (format 3 and later)" if self.format_version >= COMPRESSED_MASKS_FORMAT
                              else "uncompressed (format 2 and earlier)"),
            f"  {self.n_samples} samples (sentences), {self.n_images} images; "
            f"latents done {int(self.images_done().sum())}/{self.n_images}, "
            f"text done {int(self.text_done().sum())}/{self.n_samples}",
        ]
        for key in SETTINGS_KEYS:
            lines.append(f"{key}:")
            lines += [f"  {k}: {_show(v)}" for k, v in sorted(self.extraction_record[key].items())] or ["  (empty)"]
        per_sample = spec.bytes_per_sample(self.feature_dtype.itemsize)
        if self.quantized:  # plus a float32 scale per channel
            per_sample += sum(4 * t_.shape[0] for t_ in spec.tensors)
        stored = f"{self.feature_dtype.name}, read as {self.float_dtype.name}" if self.quantized else self.float_dtype.name
        lines.append(f"tensors ({human_bytes(per_sample)} per sample per noise level, {stored}):")
        for t_ in spec.tensors:
            lines.append(f"  {t_.name:<10} {t_.kind:<9} {t_.channels}x{t_.size}x{t_.size}  stride {t_.stride}")
        levels = self.noise_levels
        lines.append("noise levels:" if levels else "noise levels: none yet")
        for t in levels:
            lines.append(f"  T={t:<5} timestep {_number(self.timestep(t)):<5} {_noise_line(self.noise(t))}  "
                         f"{_coverage_line(self.coverage(t))}")
        bad_ids = sorted({b["sent_id"] for b in self.bad})
        if bad_ids:
            lines.append(f"bad samples: {len(bad_ids)} (sent_ids {', '.join(map(str, bad_ids[:10]))}"
                         + (", ..." if len(bad_ids) > 10 else "") + ")")
        lines.append(f"size on disk: {human_bytes(self.nbytes())}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Cache({self.path!r}, {self.n_samples} samples, T={self.noise_levels})"


def _number(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _noise_line(n: dict) -> str:
    """"ddpm alpha_bar 0.2763 snr 0.3818" / "flow sigma 0.6555 snr 0.2763 (given as sigma)" (DESIGN §5)."""
    level = "alpha_bar" if n.get("kind") == "ddpm" else "sigma"
    value, snr = n.get(level), n.get("snr")
    value = value if isinstance(value, str) else _number(float(value))
    snr = snr if isinstance(snr, str) else "inf (no noise)" if snr is None else _number(float(snr))
    return f"{n.get('kind')} {level} {value} snr {snr}" + (" (given as sigma)" if n.get("given") == "sigma" else "")


def _coverage_line(c: Coverage) -> str:
    """"done 16/142, coverage 11.3% of 142: incomplete, 126 missing" (skipped samples are not missing)."""
    line = f"done {c.done}/{c.samples}" + (f", skipped {c.skipped}" if c.skipped else "")
    line += f", coverage {100 * c.fraction:.1f}%" + (f" of the {c.expected} not skipped" if c.skipped else "")
    return line + (": complete" if c.complete else f": incomplete, {c.missing} missing")


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def human_bytes(n: int) -> str:
    """"4.9 MB": decimal units, as `refseg-cache info`, `du` and the extraction plan print sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
