"""A cache that cannot lie (issue 23): damaged stores are found, said in one line, repaired and recomputed.

Each case damages a copy of one small extracted store (10 samples, 3 images, shards of 2, T=0 and 5)
one way: a chunk file deleted, a byte flipped, an array's zarr.json deleted. Reading it must fail with
one line naming the array and the samples (never zeros, never a traceback); `refseg-cache verify`
must list it and exit 2; `--repair` then the same `refseg-extract` must give the bytes of the
undamaged store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _cache_util import store_files
from _fault_util import extract_args, extraction_reference, run  # noqa: F401
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.cache.cli import main as cache_cli
from refseg.core.errors import DamagedCacheError


def first_file(store: Path, folder: str) -> Path:
    """The first chunk file (in sorted order) under `folder` of the store."""
    files = sorted(p for p in (store / folder).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert files, folder
    return files[-1]


def delete(store: Path, folder: str) -> str:
    path = first_file(store, folder)
    path.unlink()
    return str(path.relative_to(store))


def flip(store: Path, folder: str) -> str:
    path = first_file(store, folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the chunks' bytes, before the shard index
    path.write_bytes(bytes(data))
    return str(path.relative_to(store))


def drop_metadata(store: Path, folder: str) -> str:
    (store / folder / "zarr.json").unlink()
    return f"{folder}/zarr.json"


def verify(store: Path, *flags: str):
    return CliRunner().invoke(cache_cli, ["verify", str(store), *flags])


CASES = [
    # (how, array): the noise level's features, GT masks, latents, embeddings, sample table, flags' metadata
    (delete, "t0005/s8"), (delete, "masks/gt"), (delete, "images/latent"), (delete, "t0000/attn_s16"),
    (flip, "t0005/s16"), (flip, "text/embedding"), (flip, "masks/gt"), (flip, "images/latent"),
    (delete, "index/sent_id"), (flip, "index/image_row"),
    (drop_metadata, "masks/gt"), (drop_metadata, "index/sent_id"), (drop_metadata, "text/embedding"),
    (drop_metadata, "t0005/s8"), (drop_metadata, "t0000/done"),
]


@pytest.mark.parametrize("damage, array", CASES, ids=[f"{d.__name__}-{a}" for d, a in CASES])
def test_damage_is_found_said_repaired_and_recomputed(synth_root, extraction_reference, tmp_path, damage, array):
    store = tmp_path / "C.zarr"
    shutil.copytree(extraction_reference, store)
    damage(store, array)

    # reading it: one clear error naming the array, never the fill value
    with pytest.raises(DamagedCacheError) as err:
        cache = open_cache(store)
        for t in cache.noise_levels:
            for row in np.flatnonzero(cache.done(t)):
                cache.read(t, row)
                cache.gt(row)
                cache.embeddings(row)
        cache.latents(slice(0, cache.n_images))
    assert array in str(err.value) and "refseg-cache verify" in str(err.value)

    found = verify(store)
    assert found.exit_code == 2
    assert f"damaged: {array}" in found.output
    assert "error: " in found.output and "--repair" in found.output.splitlines()[-1]

    repaired = verify(store, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: " in repaired.output and "now rerun the refseg-extract command" in repaired.output

    again = run("refseg-extract", extract_args(synth_root, store), logs=tmp_path / "logs")
    assert again.exitcode == 0, again.stderr
    assert store_files(store) == store_files(extraction_reference)
    assert verify(store).exit_code == 0


def test_a_missing_chunk_of_an_unfinished_row_still_reads_as_zeros(tmp_path):
    """Rows that were never written are not damage: they read as the fill value, and are not done."""
    from _cache_util import open_writer

    writer = open_writer(tmp_path / "c.zarr")
    writer.add_noise_level(5, timestep=5)
    cache = open_cache(tmp_path / "c.zarr")
    assert not cache.done(5).any() and not cache.read(5, 0)["s8"].any()
    assert verify(tmp_path / "c.zarr").exit_code == 0


def test_eval_and_training_refuse_a_damaged_store_in_one_line(synth_root, extraction_reference, tmp_path):
    """The commands that read a store say what is damaged instead of scoring zeros."""
    from refseg.heads.cli_eval import main as eval_main
    from refseg.heads.cli_train import main as train_main

    store = tmp_path / "C.zarr"
    shutil.copytree(extraction_reference, store)
    run_dir = tmp_path / "run"
    trained = CliRunner().invoke(train_main, ["--cache", str(store), "--noise-t", "5", "--head", "linear",
                                              "--epochs", "1", "--out", str(run_dir), "--quiet"])
    assert trained.exit_code == 0, trained.output
    delete(store, "masks/gt")
    assert CliRunner().invoke(cache_cli, ["info", str(store)]).exit_code == 0  # info reads no data
    for result in (CliRunner().invoke(eval_main, ["--run", str(run_dir), "--cache", str(store), "--quiet"]),
                   CliRunner().invoke(train_main, ["--cache", str(store), "--noise-t", "5", "--head", "linear",
                                                   "--epochs", "1", "--out", str(tmp_path / "run2"), "--quiet"])):
        # (eval warns first that the run has no best epoch and is scored on its training cache)
        errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert errors[0].startswith("error: cache ") and "is damaged: masks/gt row" in errors[0]
        assert "(sent_id " in errors[0] and "refseg-cache verify" in errors[0]


def test_info_says_whether_a_store_has_checksums(extraction_reference):
    info = open_cache(extraction_reference).describe()
    assert "checksums: CRC-32C on every chunk (format 2 and later)" in info


def test_lock_debris_of_a_killed_engine_write_is_removed_on_resume(synth_root, extraction_reference, tmp_path):
    store = tmp_path / "C.zarr"
    shutil.copytree(extraction_reference, store)
    debris = store / "t0005" / "s8" / "c" / "0" / "0" / "0" / "0.__lock"
    debris.write_bytes(b"half a shard")
    again = run("refseg-extract", extract_args(synth_root, store), logs=tmp_path / "logs")
    assert again.exitcode == 0, again.stderr
    assert not debris.exists() and store_files(store) == store_files(extraction_reference)
    assert not any(name.endswith(".__lock") for name in os.listdir(debris.parent))


def test_training_that_meets_damage_before_its_first_epoch_leaves_no_run_folder(extraction_reference, tmp_path):
    """Issue 23: with --no-preload the damage is met in the first epoch; the run folder it had made (holding
    only config.json) is taken away again, and a folder that existed before is left as it was."""
    from refseg.heads.cli_train import main as train_main

    store = tmp_path / "C.zarr"
    shutil.copytree(extraction_reference, store)
    path = first_file(store, "t0005/s8")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a truncated shard
    for out in (tmp_path / "new" / "run", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        result = CliRunner().invoke(train_main, ["--cache", str(store), "--noise-t", "5", "--head", "linear",
                                                 "--epochs", "1", "--no-preload", "--out", str(out), "--quiet"])
        assert result.exit_code == 2 and "t0005/s8" in result.stderr, result.output
        assert not (tmp_path / "new").exists() if out.name == "run" else sorted(out.iterdir()) == []
