"""The Zarr feature cache: layout, create/open, fingerprint, shard-at-a-time writes, readers, HDF5 export.

    from refseg.cache import CacheWriter, open_cache, FeatureDataset

`FeatureDataset` (torch) is imported on first use, so `refseg-cache` and plain readers do not pay
for importing torch.
"""

from refseg.cache.layout import (  # noqa: F401
    CODECS,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    ImageTable,
    SampleTable,
    build_tables,
    noise_group_name,
)
from refseg.cache.reader import Cache, open_cache  # noqa: F401
from refseg.cache.writer import CacheWriter  # noqa: F401

__all__ = [
    "CODECS", "DEFAULT_SHARD_SIZE", "FORMAT_VERSION", "ImageTable", "SampleTable", "build_tables",
    "noise_group_name", "Cache", "open_cache", "CacheWriter", "FeatureDataset", "export_h5",
]


def __getattr__(name):
    if name == "FeatureDataset":
        from refseg.cache.dataset import FeatureDataset

        return FeatureDataset
    if name == "export_h5":
        from refseg.cache.h5export import export_h5  # deferred: h5py and tqdm load for an export only

        return export_h5
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
