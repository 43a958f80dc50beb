"""Where a store's bytes go: planned from the layout before it exists (`planned_bytes`, what
`refseg-extract --dry-run` and its space check use), and measured once it does (`disk_usage`, what
`refseg-cache du` prints).

A planned size is the arrays' values at their storage type, plus what each chunk carries in a format-2
store (its CRC-32C, its 16-byte entry in its shard's index), plus the metadata files. For a compressed
store (`--codec zstd|blosc`) it is an upper bound: the values as if they did not compress. The GT
masks (zstd in every format-3 store) are planned at 1/MASKS_RATIO of their values: an estimate, not a
bound (bench/mask_bytes.py measures 1/280-1/850 on the synthetic set's masks and on polygons, 1/126 at worst).
"""

from __future__ import annotations

import math
import os

import numpy as np

from refseg.cache.layout import (DEFAULT_CACHE_DTYPE, ArrayLayout, base_arrays, is_local, local_path, noise_arrays,
                                 storage_dtypes)
from refseg.core.feature_spec import FeatureSpec

METADATA_BYTES = 1_000  # a zarr.json of one array or group (measured: 830 B on average)
ROOT_METADATA_BYTES = 5_000  # the root's attributes: settings, spec, sample selection
MASKS_RATIO = 32  # planned compression of a binary GT mask: 4x under the worst bench/mask_bytes.py measured


def array_bytes(layout: ArrayLayout, shard_size: int, checksums: bool = True, text_bytes: int = 0) -> int:
    """Bytes of one array on disk: values, per-chunk CRC and shard-index entries, its metadata."""
    rows = layout.shape[0]
    if layout.dtype == "string":
        values = text_bytes + 4 * rows  # UTF-8 bytes and a length per string
        chunks = 1
    else:
        values = math.prod(layout.shape) * np.dtype(layout.dtype).itemsize
        if layout.own_codec:  # the GT masks: binary, compressed whatever the store's codec
            values //= MASKS_RATIO
        chunks = rows if layout.per_row else 1
    overhead = chunks * (4 if checksums else 0)
    if layout.per_row:
        shards = math.ceil(rows / shard_size)
        overhead += chunks * 16 + shards * 4  # the shard index: (offset, nbytes) per chunk, and its CRC
    return values + overhead + METADATA_BYTES


def planned_bytes(spec: FeatureSpec, n_samples: int, n_images: int, noise_levels, *, cache_dtype: str = DEFAULT_CACHE_DTYPE,
                  shard_size: int = 16, per_image_levels: bool = False, text_layout: dict | None = None,
                  text_bytes: int = 0) -> dict:
    """{"store": bytes of the arrays every store has, "per_level": bytes of one noise level, "total"}."""
    feature_dtype, float_dtype = storage_dtypes(cache_dtype)
    base = sum(array_bytes(a, shard_size, text_bytes=text_bytes)
               for a in base_arrays(spec, n_samples, n_images, float_dtype, **(text_layout or {})))
    flags = 2 * (n_images + n_samples) // 8 + 2 * METADATA_BYTES  # images/done, text/done (bool, a byte each)
    base += n_images + n_samples + flags + ROOT_METADATA_BYTES + 4 * METADATA_BYTES  # + the groups
    rows = n_images if per_image_levels else n_samples
    per_level = sum(array_bytes(a, shard_size) for a in noise_arrays(spec, rows, feature_dtype))
    per_level += 2 * rows + 3 * METADATA_BYTES  # done, skipped, the group
    levels = len(list(noise_levels))
    return {"store": base, "per_level": per_level, "levels": levels, "total": base + levels * per_level}


def disk_usage(path: str) -> list[tuple[str, int]]:
    """(group or array path, bytes on disk) for every folder of the store, largest first, then the total
    as ("", bytes). Local stores only are walked here; for a remote one, fsspec's du per key."""
    sizes: dict[str, int] = {}
    if is_local(path):
        root = local_path(path)
        for folder, _, files in os.walk(root):
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
            key = os.path.relpath(folder, root)
            parts = [] if key == "." else key.split(os.sep)
            owner = "/".join(parts[:_depth(parts)])  # a chunk folder counts toward its array
            sizes[owner] = sizes.get(owner, 0) + size
    else:
        import fsspec  # deferred: remote stores only (an optional dependency)

        fs, root = fsspec.core.url_to_fs(path)
        for name, size in fs.du(root, total=False).items():
            rel = name[len(root.rstrip("/")) + 1:]
            parts = rel.split("/")[:-1]
            owner = "/".join(parts[:_depth(parts)])
            sizes[owner] = sizes.get(owner, 0) + int(size)
    total = sum(sizes.values())
    rows = sorted(((k or ".", v) for k, v in sizes.items()), key=lambda kv: (-kv[1], kv[0]))
    return rows + [("", total)]


def _depth(parts: list[str]) -> int:
    """How many leading path parts name the array (group/array), the rest being its chunk folders ("c/...")."""
    return parts.index("c") if "c" in parts else len(parts)
