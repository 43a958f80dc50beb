"""The data engine (cache/engine.py): tensorstore writes what zarr-python writes, old stores still read,
a full disk is said by its errno and file."""

from __future__ import annotations

import errno
import functools
import os

import numpy as np
import pytest
import zarr
from _cache_util import all_arrays, fill, random_contents, settings, store_files, tables, tiny_spec
from _disk_util import small_tmpfs

from refseg.cache import open_cache
from refseg.cache import layout as layout_module
from refseg.cache.engine import TensorstoreEngine
from refseg.cache.opening import NewStore
from refseg.cache.writer import CacheWriter
from refseg.core.errors import CacheWriteError, DamagedCacheError


def write_store(path, engine: str, codec: str = "none", **extraction):
    samples, images = tables(5)
    writer = CacheWriter.open(path, NewStore(spec=tiny_spec(), extraction_record=settings(**extraction),
                                             samples=samples, images=images, shard_size=4, codec=codec),
                              engine=engine)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    contents["gt"][3] = 0  # a row equal to the fill value: written all the same (format 2)
    fill(writer, contents)
    writer.close()
    return contents


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_tensorstore_and_zarr_python_write_the_same_arrays(tmp_path, codec):
    write_store(tmp_path / "ts.zarr", "tensorstore", codec)
    write_store(tmp_path / "zp.zarr", "zarr-python", codec)
    ts_arrays, zp_arrays = all_arrays(tmp_path / "ts.zarr"), all_arrays(tmp_path / "zp.zarr")
    assert sorted(ts_arrays) == sorted(zp_arrays) and len(ts_arrays) == 29
    for key in ts_arrays:
        assert ts_arrays[key].dtype == zp_arrays[key].dtype and np.array_equal(ts_arrays[key], zp_arrays[key]), key
    # every chunk is a file of its own in both: nothing is left out for equalling the fill value
    assert sorted(store_files(tmp_path / "ts.zarr")) == sorted(store_files(tmp_path / "zp.zarr"))
    assert (tmp_path / "ts.zarr" / "masks" / "gt" / "c" / "0" / "0" / "0").exists()


def test_the_same_store_whatever_the_engine_reads_exactly(tmp_path):
    contents = write_store(tmp_path / "ts.zarr", "tensorstore")
    cache = open_cache(tmp_path / "ts.zarr")
    assert np.array_equal(cache.gt(slice(0, cache.n_samples)), contents["gt"])
    assert np.array_equal(cache.read_rows(500, [7, 2, 2], "s16"), contents[("t", 500)]["s16"][[7, 2, 2]])
    assert np.array_equal(cache.latents(slice(0, cache.n_images)), contents["latent"])


def test_a_format_1_store_still_reads_and_keeps_its_fingerprint(tmp_path, monkeypatch):
    """Stores written before the engine (format 1: no data checksums, fill-value chunks not written)."""
    format2 = tmp_path / "new.zarr"
    write_store(format2, "tensorstore")
    with monkeypatch.context() as m:
        m.setattr("refseg.cache.writer.FORMAT_VERSION", 1)
        m.setattr("refseg.cache.writer.create_array", lambda group, layout, name, shard_size, codec, checksums=True:
                  layout_module.create_array(group, layout, name, shard_size, codec, checksums=False))
        m.setattr("refseg.cache.writer.create_flags", functools.partial(layout_module.create_flags, checksums=False))
        m.setattr("refseg.cache.layout.WRITE_EVERY_CHUNK", {"write_empty_chunks": False})
        contents = write_store(tmp_path / "old.zarr", "zarr-python")
    old = open_cache(tmp_path / "old.zarr")
    assert old.format_version == 1 and not old.checksums
    assert old.fingerprint == open_cache(format2).fingerprint
    assert "checksums: none on the data" in old.describe()
    assert np.array_equal(old.gt(slice(0, old.n_samples)), contents["gt"])  # the zero row reads as zeros
    for t in (0, 500):
        assert np.array_equal(old.read_rows(t, slice(0, old.n_samples), "s8"), contents[("t", t)]["s8"])
    codecs = zarr.open_group(str(tmp_path / "old.zarr"), mode="r")["t0000/s8"].metadata.codecs[0].codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec"]  # no checksum in a format-1 array


def test_a_flipped_byte_of_a_compressed_store_is_found(tmp_path):
    write_store(tmp_path / "z.zarr", "tensorstore", "zstd")
    shard = tmp_path / "z.zarr" / "t0500" / "s8" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = open_cache(tmp_path / "z.zarr")
    with pytest.raises(DamagedCacheError, match=r"t0500/s8 rows? 4.*\(sent_id .*checksum mismatch"):
        cache.read_rows(500, slice(4, 8), "s8")
    assert np.array_equal(cache.read_rows(500, slice(0, 4), "s8").shape, (4, 8, 4, 4))


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, "96k") as mount:
        yield mount


def test_a_full_disk_is_said_by_its_errno_and_file(small_disk):
    engine_root = small_disk / "c.zarr"
    root = zarr.open_group(str(engine_root), mode="w")
    root.create_array("a", shape=(64, 32, 32), dtype="float16", chunks=(1, 32, 32), shards=(16, 32, 32),
                      fill_value=0, compressors=layout_module.compressors_for("none", 2))
    engine = TensorstoreEngine(str(engine_root), checksums=True)
    with pytest.raises(OSError) as err:
        for start in range(0, 64, 16):
            engine.write("a", start, np.ones((16, 32, 32), np.float16)).result()
    assert err.value.errno == errno.ENOSPC and str(engine_root / "a" / "c") in err.value.filename
    message = str(CacheWriteError.from_os_error(str(engine_root), err.value))
    assert "No space left on device (ENOSPC) at " in message
    assert not [f for f in os.listdir(small_disk / "c.zarr" / "a" / "c") if f.endswith(".__lock")]


def test_format_3_compresses_the_masks_and_a_format_2_store_still_reads_and_verifies(tmp_path, monkeypatch):
    """Format 3 stores the GT masks as zstd frames (README's disk table); format-2 stores keep raw masks."""
    from refseg.cache.verify import verify

    contents = write_store(tmp_path / "new.zarr", "tensorstore")
    with monkeypatch.context() as m:
        m.setattr("refseg.cache.writer.FORMAT_VERSION", 2)
        write_store(tmp_path / "old.zarr", "tensorstore")

    def mask_codecs(name):
        codecs = zarr.open_group(str(tmp_path / name), mode="r")["masks/gt"].metadata.codecs[0].codecs
        return [type(c).__name__ for c in codecs]

    assert mask_codecs("new.zarr") == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert mask_codecs("old.zarr") == ["BytesCodec", "Crc32cCodec"]
    new, old = open_cache(tmp_path / "new.zarr"), open_cache(tmp_path / "old.zarr")
    assert (new.format_version, old.format_version) == (3, 2) and new.fingerprint == old.fingerprint
    assert "GT masks: zstd-compressed (format 3 and later)" in new.describe()
    assert "GT masks: uncompressed (format 2 and earlier)" in old.describe()
    rows = slice(0, new.n_samples)
    assert np.array_equal(new.gt(rows), contents["gt"]) and np.array_equal(old.gt(rows), contents["gt"])

    def folder_bytes(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    assert folder_bytes(tmp_path / "new.zarr" / "masks") < folder_bytes(tmp_path / "old.zarr" / "masks")
    assert verify(str(tmp_path / "new.zarr")) == [] and verify(str(tmp_path / "old.zarr")) == []
