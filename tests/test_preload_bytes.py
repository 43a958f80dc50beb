"""Training's preload decision counts the bytes FeatureDataset will allocate (issue 25 §2): the store's
float type, so a --cache-dtype fp32 cache counts 4 bytes a value, not 2."""

from __future__ import annotations

import pytest
from _cache_util import fill, open_writer, random_contents

from refseg.cache import FeatureDataset, open_cache
from refseg.heads.train_setup import _preload_ok


@pytest.mark.parametrize("cache_dtype, itemsize", [("float16", 2), ("float32", 4)])
def test_preload_need_is_what_the_dataset_allocates(tmp_path, capsys, cache_dtype, itemsize):
    extraction = {} if cache_dtype == "float16" else {"cache_dtype": cache_dtype}
    writer = open_writer(tmp_path / "c.zarr", **extraction)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    for name, values in contents.items():
        if name not in ("input_ids", "attention_mask", "gt"):
            contents[name] = values.astype(cache_dtype) if hasattr(values, "astype") else {
                k: v.astype(cache_dtype) for k, v in values.items()}
    fill(writer, contents)
    cache = open_cache(tmp_path / "c.zarr")
    names = list(cache.spec.names)
    assert _preload_ok(True, cache, names, True, cache.n_samples, progress=True)
    need = FeatureDataset.preload_bytes(cache.path, 0, names=names)
    assert f"preload: {need / 1e9:.2f} GB" in capsys.readouterr().out
    data = FeatureDataset(cache.path, 0, names=names, preload=True)
    assert data.nbytes() == need and data._data["s8"].dtype.itemsize == itemsize
    assert need == cache.n_samples * FeatureDataset.row_bytes(cache.spec, names, True, itemsize)


def test_auto_preload_of_a_float32_cache_counts_four_bytes(tmp_path, monkeypatch):
    writer = open_writer(tmp_path / "c.zarr", cache_dtype="float32")
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, {k: (v.astype("float32") if k in ("latent", "embedding") else
                      {n: a.astype("float32") for n, a in v.items()} if isinstance(v, dict) else v)
                  for k, v in contents.items()})
    cache = open_cache(tmp_path / "c.zarr")
    names = list(cache.spec.names)
    need = FeatureDataset.preload_bytes(cache.path, 0, names=names)
    half = cache.n_samples * FeatureDataset.row_bytes(cache.spec, names, True, 2)  # what 2 bytes a value gives
    # RAM for the 2-byte estimate but not for the real need: auto preload must say no
    monkeypatch.setattr("refseg.heads.train_setup.available_memory", lambda: (need + half))
    assert half * 2 <= need + half < need * 2
    assert not _preload_ok("auto", cache, names, True, cache.n_samples, progress=False)
    monkeypatch.setattr("refseg.heads.train_setup.available_memory", lambda: 2 * need)
    assert _preload_ok("auto", cache, names, True, cache.n_samples, progress=False)
