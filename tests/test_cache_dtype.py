"""`--cache-dtype fp32`: latents, embeddings and features stored as float32 (issue 12, item 3).

Stage 1 computes the same latents and embeddings in either store, so the float16 store's equal the
float32 store's rounded to float16. Stage 2 starts from the *stored* latents and embeddings, so a
float32 store's features also lack the rounding of its inputs: they differ from the float16 store's
by more than one final rounding, by little. The float16 store keeps the fingerprint it had before
the option existed (the option is recorded only when it is not float16).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.cache.fingerprint import compute_fingerprint, fingerprint_payload
from refseg.cache.layout import store_nbytes
from refseg.extract.pipeline import run_extraction


@pytest.fixture(scope="module")
def stores(extract_config, tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    half = root / "half.zarr"
    full = root / "full.zarr"
    run_extraction(extract_config(half, noise_ts=(5,)), backbone=tiny_backbone)
    run_extraction(extract_config(full, noise_ts=(5,), cache_dtype="fp32"), backbone=tiny_backbone)
    return open_cache(half), open_cache(full)


def test_float32_store_holds_float32_and_rounds_to_the_float16_store(stores):
    half, full = stores
    rows, images = list(range(half.n_samples)), list(range(half.n_images))
    for read in (lambda c: c.latents(images), lambda c: c.embeddings(rows)):
        wide, narrow = read(full), read(half)
        assert wide.dtype == np.float32 and narrow.dtype == np.float16
        assert np.array_equal(wide.astype(np.float16), narrow)
        assert not np.array_equal(wide, narrow.astype(np.float32))  # the precision the float16 store drops
    for info in full.spec.tensors:
        wide, narrow = full.read_rows(5, rows, info.name), half.read_rows(5, rows, info.name)
        assert wide.dtype == np.float32 and narrow.dtype == np.float16
        error = np.abs(wide - narrow.astype(np.float32)).max() / np.abs(wide).max()
        assert 0 < error < 2e-2, (info.name, error)  # tiny, random: 0.7% at most measured


def test_only_a_float32_store_records_the_option(stores):
    half, full = stores
    assert "cache_dtype" not in half.extraction_record["extraction"]
    assert full.extraction_record["extraction"]["cache_dtype"] == "float32"
    assert half.fingerprint != full.fingerprint
    # the float16 store's fingerprint is what its settings gave before the option existed
    payload = fingerprint_payload(half.extraction_record, half.spec, half.index["sent_id"])
    assert compute_fingerprint(payload) == half.fingerprint


def test_float32_features_take_twice_the_disk(stores):
    half, full = stores
    sizes = [store_nbytes(str(c.path) + "/t0005") for c in (half, full)]
    # two more bytes per value; flags, shard indices and metadata are the same size in both
    assert sizes[1] - sizes[0] == half.n_samples * half.spec.bytes_per_sample(2), sizes


def test_info_and_training_read_a_float32_store(stores, tmp_path):
    from refseg.cache.cli import main as cache_main
    from refseg.heads.train import train

    _, full = stores
    info = CliRunner().invoke(cache_main, ["info", str(full.path)])
    assert info.exit_code == 0 and "per sample per noise level, float32" in info.output, info.output
    summary = train(str(full.path), 5, "linear", tmp_path / "run", epochs=1, batch_size=4, device="cpu",
                    progress=False)
    assert summary["epochs"] == 1 and summary["samples"] == full.n_samples and np.isfinite(summary["loss"])


def test_cli_takes_cache_dtype_and_refuses_others(synth_root, tmp_path):
    from refseg.extract.cli import main

    args = ["--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", "val", "--image-size", "64",
            "--token-length", "8", "--limit", "2", "--out", str(tmp_path / "c.zarr"), "--quiet"]
    bad = CliRunner().invoke(main, args + ["--cache-dtype", "fp64"])
    assert bad.exit_code == 2 and "fp64" in bad.output
    ok = CliRunner().invoke(main, args + ["--cache-dtype", "fp32"])
    assert ok.exit_code == 0, ok.output
    assert open_cache(tmp_path / "c.zarr").read_rows(0, [0], "s8").dtype == np.float32
