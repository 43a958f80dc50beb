"""`--cache-dtype int8` (issue 24, item 1): features as 8-bit codes with per-sample, per-channel scales.

The latents and embeddings stay float16, so stage 2 starts from the same inputs as in a float16 store
and the features differ from that store's by the quantization alone: at most half a step
(`scale / 2`) per value. Readers get float16 back; heads, training and evaluation do not change.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.cache.cli import main as cache_cli
from refseg.cache.layout import noise_arrays
from refseg.cache.quantize import dequantize, quantize, scale_name
from refseg.core.errors import DamagedCacheError
from refseg.extract.pipeline import run_extraction


def test_quantize_keeps_each_value_within_half_a_step_and_zeros_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32) * np.array([1e-3, 1, 30, 0])[None, :, None, None]
    codes, scale = quantize(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 4)
    back = dequantize(codes, scale, np.float32)
    assert np.all(np.abs(back - x) <= scale[..., None, None] / 2 + 1e-7)
    assert np.array_equal(np.abs(codes).reshape(3, 4, -1).max(axis=2)[:, :3], np.full((3, 3), 127))
    assert not back[:, 3].any() and not scale[:, 3].any()  # an all-zero channel: scale 0, read as zeros


def test_int8_features_take_at_most_055_of_float16_for_sd15():
    from bench.read import spec_for

    spec = spec_for(512, 40)
    def stored(dtype):
        return sum(int(np.prod(a.shape[1:])) * np.dtype(a.dtype).itemsize for a in noise_arrays(spec, 1, dtype))
    ratio = stored("int8") / stored("float16")
    assert 0.5 < ratio <= 0.55, ratio


@pytest.fixture(scope="module")
def stores(extract_config, tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    half, eight = root / "half.zarr", root / "eight.zarr"
    run_extraction(extract_config(half, noise_ts=(5,)), backbone=tiny_backbone)
    run_extraction(extract_config(eight, noise_ts=(5,), cache_dtype="int8"), backbone=tiny_backbone)
    return open_cache(half), open_cache(eight)


def test_int8_store_reads_float16_within_half_a_step_of_the_float16_store(stores):
    half, eight = stores
    rows = list(range(half.n_samples))
    assert eight.extraction_record["extraction"]["cache_dtype"] == "int8" and half.fingerprint != eight.fingerprint
    assert np.array_equal(eight.latents(slice(0, eight.n_images)), half.latents(slice(0, half.n_images)))
    for info in half.spec.tensors:
        narrow, wide = eight.read_rows(5, rows, info.name), half.read_rows(5, rows, info.name)
        assert narrow.dtype == np.float16 and narrow.shape == wide.shape
        codes, scale = quantize(wide.astype(np.float32))
        assert np.array_equal(narrow, dequantize(codes, scale)), info.name  # exactly the float16 store, quantized
        assert np.array_equal(eight.read(5, 3)[info.name], narrow[3])
    stored = eight._root["t0005/s8"]
    assert stored.dtype == np.int8 and eight._root[f"t0005/{scale_name('s8')}"].shape == (eight.n_samples, 32)


def test_int8_bytes_do_not_depend_on_the_batch_size(extract_config, tiny_backbone, stores, tmp_path):
    from _cache_util import store_files

    out = tmp_path / "b1.zarr"
    run_extraction(extract_config(out, noise_ts=(5,), cache_dtype="int8", batch_size=1), backbone=tiny_backbone)
    assert store_files(out) == store_files(stores[1].path)


def test_a_head_trains_and_evaluates_on_int8_features(stores, tmp_path):
    from refseg.heads.cli_eval import main as eval_main
    from refseg.heads.cli_train import main as train_main

    half, eight = stores
    run = tmp_path / "run"
    trained = CliRunner().invoke(train_main, ["--cache", str(eight.path), "--noise-t", "5", "--head", "linear",
                                              "--epochs", "1", "--out", str(run), "--quiet"])
    assert trained.exit_code == 0, trained.output
    # a run trained on int8 features evaluates on float16 ones and back: storage, not meaning
    for cache in (eight.path, half.path):
        out = tmp_path / f"{os.path.basename(cache)}.json"
        scored = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(cache), "--quiet", "--json", str(out)])
        assert scored.exit_code == 0, scored.output
        summary = json.loads(out.read_text())["summary"]
        assert 0 < summary["oIoU"] <= 100 and summary["n"] == eight.n_samples


def test_a_damaged_scale_is_found_like_any_chunk(stores, tmp_path):
    store = tmp_path / "eight.zarr"
    shutil.copytree(stores[1].path, store)
    shard = store / "t0005" / scale_name("s16") / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCacheError, match="s16_scale"):
        open_cache(store).read_rows(5, slice(0, 4), "s16")
    found = CliRunner().invoke(cache_cli, ["verify", str(store)])
    assert found.exit_code == 2 and f"damaged: t0005/{scale_name('s16')}" in found.output


@pytest.mark.parametrize("shape", [(3, 70, 64, 64), (2, 5, 300, 301), (0, 4, 2, 2), (16, 3, 2)])
def test_dequantizing_block_by_block_gives_the_whole_products_values(shape, monkeypatch):
    """Blocks of channels (DEQUANTIZE_BLOCK values; one smaller than a channel too) round each value as
    one float32 product of the whole array, rounded to float16 / kept float32, does."""
    import refseg.cache.quantize as quantize_module

    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=shape, dtype=np.int8)
    scale = rng.random(shape[:-2], dtype=np.float32) * 3
    whole = codes.astype(np.float32) * scale[..., None, None]
    for block in (quantize_module.DEQUANTIZE_BLOCK, 1000):
        monkeypatch.setattr(quantize_module, "DEQUANTIZE_BLOCK", block)
        for dtype in (np.float16, np.float32):
            got = dequantize(codes, scale, dtype)
            assert got.dtype == dtype and got.shape == shape
            assert got.tobytes() == whole.astype(dtype).tobytes()
            out = np.full(shape, 9, dtype)  # what FeatureDataset passes: a reused batch array
            assert dequantize(codes, scale, dtype, out=out) is out and out.tobytes() == got.tobytes()
