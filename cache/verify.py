"""`refseg-cache verify CACHE [--repair]`: read every finished row of a store and say what is damaged.

What counts as finished: a row whose `done` flag (or, in a noise level, `skipped` flag) is set, and
every row of the arrays written when the store was created (`index/*`, `images/image_id`,
`images/orig_hw`). Each is read back through the engine, shard by shard (cache/engine.py: in a
format-2 store an absent chunk or a failed CRC-32C is an error; in a format-1 store only a missing
shard file and the shard index's CRC can be seen). What it finds is a list of `Damage`.

`repair` makes the same `refseg-extract` command recompute exactly what is damaged:
- an array without its metadata (zarr.json) gets it back, rebuilt from the store's recorded spec,
  settings and layout (cache/layout.py), and is read again;
- damaged rows of a per-row array get their `done` (and `skipped`) flags cleared: their shards are
  computed again and written whole, the bytes an undamaged run writes;
- damaged sample tables (`index/*`, `images/image_id`, `images/orig_hw`) are rewritten from the dataset
  by the extraction itself when it resumes (`CacheWriter.open` restores them);
- a flags chunk that fails its checksum is rewritten as "not done".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import zarr

from refseg.cache.engine import Engine, TensorstoreEngine, ZarrEngine
from refseg.cache.layout import (DEFAULT_CACHE_DTYPE, FORMAT_ATTR, TEXT_LAYOUT_ATTR, ArrayLayout, base_arrays,
                                 create_array, create_flags, has_checksums, is_local, noise_arrays, open_root,
                                 parse_noise_group, storage_dtypes, PER_IMAGE, ROWS_ATTR)
from refseg.core.errors import CacheError
from refseg.core.feature_spec import FeatureSpec

# the arrays whose rows a stage's flags say are finished; the rest are written when the store is made
FLAGS_OF_GROUP = {"images": ("images/done",), "text": ("text/done",), "masks": ("text/done",)}
TABLES = ("index", "images/image_id", "images/orig_hw")


@dataclass
class Damage:
    """One array's damage: which rows (empty: the whole array), what is wrong, and how it is mended."""

    array: str
    what: str
    rows: list[int] = field(default_factory=list)

    @property
    def is_metadata(self) -> bool:
        return self.what.startswith("no metadata")


@dataclass
class Expected:
    """Every array a store should hold, from its attributes alone (its arrays may have lost their metadata)."""

    layouts: dict[str, ArrayLayout]  # data arrays by path
    flags: dict[str, tuple[int, str]]  # flag array path -> (length, dimension name)
    shard_size: int
    codec: str
    checksums: bool


def expected_arrays(root: zarr.Group) -> Expected:
    attrs = root.attrs.asdict()
    spec = FeatureSpec.from_dict(attrs["spec"])
    feature_dtype, float_dtype = storage_dtypes(attrs["extraction"].get("cache_dtype", DEFAULT_CACHE_DTYPE))
    n = int(attrs["samples"]["n"])
    m = _image_count(root)
    text = {k: (tuple(v) if isinstance(v, list) else v) for k, v in attrs.get(TEXT_LAYOUT_ATTR, {}).items()}
    layouts = {a.path: a for a in base_arrays(spec, n, m, float_dtype, **text, format_version=attrs[FORMAT_ATTR])}
    flags = {"images/done": (m, "image"), "text/done": (n, "sample")}
    for name, group in sorted(root.groups()):
        if parse_noise_group(name) is not None:
            rows, dim = (m, "image") if group.attrs.get(ROWS_ATTR) == PER_IMAGE else (n, "sample")
            for a in noise_arrays(spec, rows, feature_dtype, dim):
                layouts[f"{name}/{a.path}"] = ArrayLayout(f"{name}/{a.path}", a.shape, a.dtype, a.dims, a.per_row,
                                                          a.compressible)
            flags[f"{name}/done"] = flags[f"{name}/skipped"] = (rows, dim)
    return Expected(layouts, flags, int(attrs["shard_size"]), attrs["codec"], has_checksums(attrs[FORMAT_ATTR]))


def _image_count(root: zarr.Group) -> int:
    """The number of images, from whichever per-image array still has its metadata (or the sample table)."""
    for key in ("images/image_id", "images/orig_hw", "images/latent", "images/done"):
        if _array(root, key) is not None:
            return int(root[key].shape[0])
    image_row = _array(root, "index/image_row")
    if image_row is not None:
        return int(image_row[:].max()) + 1
    raise CacheError("cannot tell how many images the store holds: every per-image array and index/image_row "
                     "lost its metadata; extract the store again")


def _array(root: zarr.Group, key: str):
    try:
        array = root[key]
    except KeyError:
        return None
    return array if isinstance(array, zarr.Array) else None


def verify(path: str) -> list[Damage]:
    """Every damage found in the store at `path` (a CacheError if it is not a refseg cache at all)."""
    path = os.fspath(path)
    root = open_root(path, mode="r")
    expected = expected_arrays(root)
    engine = _engine(path, root, expected.checksums)
    damage = [Damage(key, "no metadata (zarr.json)") for key in [*expected.layouts, *expected.flags]
              if _array(root, key) is None]
    lost = {d.array for d in damage}
    flags: dict[str, np.ndarray] = {}
    for key in expected.flags:
        if key in lost:
            continue
        try:
            flags[key] = root[key][:]
        except ValueError as exc:  # a flag chunk failing its checksum (absent ones read as "not done")
            damage.append(Damage(key, f"unreadable ({' '.join(str(exc).split())})"))
    for key, layout in expected.layouts.items():
        if key in lost:
            continue
        if layout.dtype == "string":
            damage += _verify_strings(root, key, expected.checksums)
            continue
        finished = _finished_rows(key, layout, flags)
        bad = _damaged_rows(engine, key, finished, expected.shard_size if layout.per_row else layout.shape[0])
        for what, rows in _group_by_what(bad).items():
            damage.append(Damage(key, what, rows))
    return damage


def _engine(path: str, root, checksums: bool) -> Engine:
    # tensorstore names the damaged file; nothing here forks (a `verify` is its own command)
    return TensorstoreEngine(path, checksums) if is_local(path) else ZarrEngine(path, checksums, root)


def _finished_rows(key: str, layout: ArrayLayout, flags: dict[str, np.ndarray]) -> np.ndarray:
    group = key.split("/")[0]
    if not layout.per_row or key.startswith(TABLES):
        return np.ones(layout.shape[0], dtype=bool)  # written when the store was created
    names = FLAGS_OF_GROUP.get(group, (f"{group}/done", f"{group}/skipped"))
    finished = np.zeros(layout.shape[0], dtype=bool)
    for name in names:
        if name in flags:
            finished |= flags[name]
    return finished


def _damaged_rows(engine: Engine, key: str, finished: np.ndarray, rows_per_read: int) -> dict[int, str]:
    bad: dict[int, str] = {}
    for start in range(0, len(finished), rows_per_read):
        stop = min(start + rows_per_read, len(finished))
        wanted = np.flatnonzero(finished[start:stop]) + start
        if not wanted.size:
            continue
        found = engine.damaged_rows(key, start, stop)
        bad.update({r: why for r, why in found.items() if finished[r]})
    return bad


def _group_by_what(bad: dict[int, str]) -> dict[str, list[int]]:
    """{what: rows}, with the file names taken out of `what` so that one cause is one line."""
    grouped: dict[str, list[int]] = {}
    for row, why in sorted(bad.items()):
        grouped.setdefault(why.split(" (")[0], []).append(row)
    return grouped


def _verify_strings(root: zarr.Group, key: str, checksums: bool) -> list[Damage]:
    array = root[key]
    if checksums and array.nchunks_initialized < array.nchunks:
        return [Damage(key, "chunk file missing", list(range(array.shape[0])))]
    try:
        array[:]
    except ValueError as exc:
        return [Damage(key, f"unreadable ({' '.join(str(exc).split())})", list(range(array.shape[0])))]
    return []


def repair(path: str, damage: list[Damage]) -> list[str]:
    """Mend `damage` (from `verify`) so that rerunning the extraction recomputes exactly it; what was done."""
    path = os.fspath(path)
    root = open_root(path, mode="r+")
    expected = expected_arrays(root)
    done: list[str] = []
    for d in [d for d in damage if d.is_metadata]:
        group_path, _, name = d.array.rpartition("/")
        group = root[group_path]
        if d.array in expected.flags:
            n, dim = expected.flags[d.array]
            create_flags(group, name, n, expected.shard_size, dim=dim, checksums=expected.checksums)
        else:
            create_array(group, expected.layouts[d.array], name, expected.shard_size, expected.codec, expected.checksums)
        done.append(f"rebuilt the metadata of {d.array}")
    for d in [d for d in damage if not d.is_metadata]:
        if d.array in expected.flags:
            flags = root[d.array]  # written as the writer writes flags: an all-False chunk is no file
            flags[:] = np.zeros(flags.shape, dtype=bool)
            done.append(f"reset {d.array} to not done (its chunks failed their checksum)")
        elif d.array.startswith(TABLES) or d.array == "index/text":
            done.append(f"{d.array} will be rewritten from the dataset by the extraction")
        else:
            group = d.array.split("/")[0]
            names = FLAGS_OF_GROUP.get(group, (f"{group}/done", f"{group}/skipped"))
            for name in names:
                flags = root[name]
                values = flags[:]
                values[d.rows] = False
                flags[:] = values
            done.append(f"cleared {' and '.join(names)} of {len(d.rows)} rows damaged in {d.array}")
    return done


def describe(path: str, damage: list[Damage], root: zarr.Group | None = None) -> list[str]:
    """One line per damage, rows named by sent_id (image_id for per-image arrays) where the index reads."""
    root = root if root is not None else open_root(os.fspath(path), mode="r")
    ids = _ids(root)
    per_image = {name for name, group in root.groups() if group.attrs.get(ROWS_ATTR) == PER_IMAGE}
    lines = []
    for d in damage:
        where = ""
        if d.rows:
            by_image = d.array.startswith("images/") or d.array.split("/")[0] in per_image
            noun, column = ("image_id", ids[1]) if by_image else ("sent_id", ids[0])
            rows = d.rows
            shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            where = f" rows {shown}"
            if column is not None and not d.array.startswith(TABLES):
                named = ", ".join(str(int(column[r])) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
                where += f" ({noun} {named})"
        lines.append(f"{d.array}:{where}: {d.what}")
    return lines


def _ids(root: zarr.Group):
    out = []
    for key in ("index/sent_id", "images/image_id"):
        try:
            out.append(np.asarray(root[key][:]))
        except (KeyError, ValueError):
            out.append(None)
    return out
