"""`export_h5(cache, out.h5)`: the same arrays and groups as an HDF5 file, for tools that want one file.

Arrays keep their names, shapes and dtypes (strings become UTF-8 variable-length strings, flags
stay bool); per-sample arrays are chunked one sample per chunk, as in the store. Attributes that are
not scalars (settings dicts, the spec, lists) are stored as sorted JSON strings. The file is written
under a temporary name and renamed at the end, so an interrupted export leaves no half file.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import zarr
from tqdm import tqdm

from refseg.cache.reader import open_cache
from refseg.core.errors import CacheError

_BLOCK_BYTES = 64 * 2**20  # copy this much at a time


def _h5_attr(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def _copy_attrs(src: dict, dst) -> None:
    for key in sorted(src):
        dst[key] = _h5_attr(src[key])


def _arrays(group: zarr.Group, prefix: str = ""):
    """(path, array) for every array under `group`, depth first, in name order."""
    for name, node in sorted(group.members(), key=lambda m: m[0]):
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Group):
            yield from _arrays(node, path + "/")
        else:
            yield path, node


def _groups(group: zarr.Group, prefix: str = ""):
    for name, node in sorted(group.groups(), key=lambda m: m[0]):
        path = f"{prefix}{name}"
        yield path, node
        yield from _groups(node, path + "/")


def export_h5(cache_path, out_path, overwrite: bool = False, progress: bool = False) -> str:
    """Write the cache at `cache_path` to the HDF5 file `out_path`; returns `out_path`."""
    cache_path, out_path = os.fspath(cache_path), os.fspath(out_path)
    cache = open_cache(cache_path)  # refuses what is not a refseg cache, with the usual messages
    if os.path.exists(out_path) and not overwrite:
        raise CacheError(f"{out_path} already exists (use --overwrite to replace it)")
    root = zarr.open_group(cache_path, mode="r")
    arrays = list(_arrays(root))
    total = sum(int(np.prod(a.shape)) * (a.dtype.itemsize if a.dtype.kind != "T" else 1) for _, a in arrays)
    tmp = out_path + ".partial"
    try:
        with h5py.File(tmp, "w") as f, tqdm(total=total, unit="B", unit_scale=True, desc="export-h5",
                                            disable=not progress) as bar:
            _copy_attrs(root.attrs.asdict(), f.attrs)
            for path, group in _groups(root):
                _copy_attrs(group.attrs.asdict(), f.require_group(path).attrs)
            for path, array in arrays:
                _copy_array(array, f, path, cache.shard_size, bar)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _copy_array(array: zarr.Array, f: h5py.File, path: str, shard_size: int, bar) -> None:
    shape = array.shape
    if array.dtype.kind in "TUO":  # variable-length strings
        values = np.asarray([str(s) for s in array[:]], dtype=object)
        f.create_dataset(path, data=values, dtype=h5py.string_dtype("utf-8"))
        bar.update(len(values))  # counted as one byte each in the total
        _copy_attrs(array.attrs.asdict(), f[path].attrs)
        return
    dtype = np.dtype(array.dtype)
    per_row = array.shards is not None  # the per-sample arrays: one sample per chunk, as in the store
    # a store holds at least one sample and one image (validate_tables), so no axis here is empty
    chunks = (1, *shape[1:]) if per_row else None
    dataset = f.create_dataset(path, shape=shape, dtype=dtype, chunks=chunks)
    # every array of the layout is created with dimension names (layout.create_array, create_flags)
    dataset.attrs["dimension_names"] = json.dumps(list(array.metadata.dimension_names))
    _copy_attrs(array.attrs.asdict(), dataset.attrs)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    block = max(1, _BLOCK_BYTES // row_bytes // shard_size) * shard_size  # whole shards per read
    for start in range(0, shape[0], block):
        stop = min(start + block, shape[0])
        dataset[start:stop] = array[start:stop]
        bar.update((stop - start) * row_bytes)
