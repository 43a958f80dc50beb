"""The Zarr feature cache: layout, create/open, fingerprint, shard-at-a-time writes, readers, HDF5 export."""
