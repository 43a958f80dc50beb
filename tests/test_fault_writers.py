"""Several `refseg-extract` processes on one store (issue 7, point 2): `--shard i/n`, torchrun's
RANK/WORLD_SIZE, the same command started twice, a part that runs alone, a rank that hangs.

Each run is a real process (tests/_fault_util.py), so the store's file locks are really contended.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from _cache_util import fill, open_writer, random_contents, store_files
from _fault_util import (computed, extract_args, extraction_reference, partial_files, run, start,  # noqa: F401
                         start_function)
from click.testing import CliRunner

from refseg.cache import open_cache


def test_processes_creating_one_store_at_the_same_instant_make_one_store(tmp_path):
    """Four processes open the same absent store at the same moment, add the same noise levels, and each
    writes its quarter of the shards: the store equals one written by a single writer."""
    store = tmp_path / "c.zarr"
    at = time.time() + 1.0  # after every process has started
    calls = [start_function("_fault_util:call_at", at, "_fault_util:fill_part_of_tiny_store", str(store), k, 4,
                            logs=tmp_path / "logs") for k in range(4)]
    for c in calls:
        assert c.wait(60).exitcode == 0, c.stderr
    with open_writer(tmp_path / "one.zarr") as one:
        fill(one, random_contents(one.spec, one.n_samples, one.n_images))
    assert partial_files(store) == [] and store_files(store) == store_files(tmp_path / "one.zarr")


def test_two_ranks_fill_one_store_exactly_like_one_process(synth_root, extraction_reference, tmp_path):
    """Rank 0 by --shard 0/2, rank 1 the torchrun way (RANK=1 WORLD_SIZE=2), started together on no store."""
    store = tmp_path / "C.zarr"
    rank0 = start("refseg-extract", extract_args(synth_root, store, "--shard", "0/2"), logs=tmp_path / "logs")
    rank1 = start("refseg-extract", extract_args(synth_root, store), logs=tmp_path / "logs",
                  env={"RANK": "1", "WORLD_SIZE": "2"})
    for rank in (rank0.wait(), rank1.wait()):
        assert rank.exitcode == 0, rank.stderr
    assert store_files(store) == store_files(extraction_reference)
    c0, c1 = computed(rank0.stdout), computed(rank1.stdout)
    # each rank ran the UNet on its own shards only: rows 0-1, 4-5, 8-9 for rank 0
    assert (c0["unet T=0"], c1["unet T=0"]) == (6, 4) and (c0["unet T=5"], c1["unet T=5"]) == (6, 4)
    # stage 1 was shared, never done twice (a rank may take over shards the other had not started)
    assert c0["vae (images)"] + c1["vae (images)"] == 3
    assert c0["text encoder (sentences)"] + c1["text encoder (sentences)"] == 10


def test_the_same_command_twice_at_once_shares_the_shards(synth_root, extraction_reference, tmp_path):
    store = tmp_path / "C.zarr"
    runs = [start("refseg-extract", extract_args(synth_root, store), logs=tmp_path / "logs") for _ in range(2)]
    for r in runs:
        assert r.wait().exitcode == 0, r.stderr
    assert store_files(store) == store_files(extraction_reference)
    counts = [computed(r.stdout) for r in runs]
    # every shard was computed by exactly one of them
    assert {stage: sum(c[stage] for c in counts) for stage in counts[0]} == {
        "vae (images)": 3, "text encoder (sentences)": 10, "unet T=0": 10, "unet T=5": 10}


def test_a_part_run_alone_does_all_of_stage_one_then_the_other_part_finishes(synth_root, extraction_reference,
                                                                          tmp_path):
    store = tmp_path / "C.zarr"
    logs = tmp_path / "logs"
    first = run("refseg-extract", extract_args(synth_root, store, "--shard", "1/2"), logs=logs)
    assert first.exitcode == 0, first.stderr
    # nobody was working on part 0's latents and embeddings, which part 1's UNet stage needs: it computed them
    assert computed(first.stdout) == {"vae (images)": 3, "text encoder (sentences)": 10, "unet T=0": 4,
                                      "unet T=5": 4}
    assert "not complete yet (T=0: 3 shards, T=5: 3 shards to do)" in first.stdout
    second = run("refseg-extract", extract_args(synth_root, store, "--shard", "0/2"), logs=logs)
    assert second.exitcode == 0, second.stderr
    assert computed(second.stdout) == {"vae (images)": 0, "text encoder (sentences)": 0, "unet T=0": 6,
                                       "unet T=5": 6}
    assert "not complete" not in second.stdout
    assert store_files(store) == store_files(extraction_reference)


HOLDER = textwrap.dedent("""
    import sys, time
    from refseg.cache.lock import StoreLock
    path, stage, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lock = StoreLock(path)
    with lock.metadata():
        lock.join()                      # a writer of the store ...
    assert lock.claim(stage if stage in ("images", "text") else int(stage), shard)  # ... holding one shard
    print("holding", flush=True)
    time.sleep(120)                      # ... and hanging
""")


def hold(store, stage, shard) -> subprocess.Popen:
    """A separate process that claims shard `shard` of `stage` of `store` and hangs."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), str(stage), str(shard)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_hanging_writer_is_waited_for_then_reported_and_its_shard_taken_over_when_it_dies(
        synth_root, extraction_reference, tmp_path):
    store = tmp_path / "C.zarr"
    logs = tmp_path / "logs"
    holder = hold(store, "images", 0)
    try:
        # rank 1 cannot start its UNet stage without image shard 0, which a live process holds
        waited = run("refseg-extract", extract_args(synth_root, store, "--shard", "1/2", "--wait-timeout", "2"),
                     logs=logs)
        assert waited.exitcode == 2
        lines = waited.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: waited 2 s for the other processes writing"), lines
        assert "latents of 2/3 images and the embeddings of 0/10 sentences" in lines[0]
        assert "rerun to resume" in lines[0]
        cache = open_cache(store)  # what it did is kept: the other image shard and every sentence
        assert cache.images_done().tolist() == [False, False, True] and cache.text_done().all()

        # replacing the store under a live writer is refused, the store left as it is
        before = store_files(store)
        other = run("refseg-extract", extract_args(synth_root, store, "--token-length", "12", "--overwrite"),
                    logs=logs)
        assert other.exitcode == 2
        assert "is being written by another process now" in other.stderr and other.stderr.count("\n") == 1
        assert store_files(store) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without finishing: its shard is free again and the rerun takes it over
    resumed = run("refseg-extract", extract_args(synth_root, store, "--shard", "1/2"), logs=logs)
    assert resumed.exitcode == 0, resumed.stderr
    assert computed(resumed.stdout)["vae (images)"] == 2
    last = run("refseg-extract", extract_args(synth_root, store, "--shard", "0/2"), logs=logs)
    assert last.exitcode == 0, last.stderr
    assert partial_files(store) == [] and store_files(store) == store_files(extraction_reference)


def test_torchrun_variables_are_checked(tmp_path):
    from refseg.extract.cli import main

    base = ["--data-root", str(tmp_path), "--dataset", "x", "--split", "val", "--out", str(tmp_path / "c.zarr")]
    for env, needle in [({"RANK": "a", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE must be integers"),
                        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..WORLD_SIZE-1")]:
        result = CliRunner(env=env).invoke(main, base)
        assert result.exit_code == 2 and needle in result.output, result.output


def test_a_shard_another_process_holds_is_left_to_it_and_reported(synth_root, tiny_backbone, extraction_reference,
                                                                 tmp_path):
    from refseg.extract.pipeline import ExtractionConfig, run_extraction

    store = tmp_path / "C.zarr"
    holder = hold(store, 5, 1)  # shard 1 (rows 2-3) of noise level T=5
    try:
        cfg = ExtractionConfig(data_root=str(synth_root), dataset="refcoco-synth", split="train", sentences="first",
                               limit=10, out=str(store), noise_ts=(0, 5), image_size=64, token_length=16,
                               shard_size=2, batch_size=2, progress=False)
        report = run_extraction(cfg, backbone=tiny_backbone)
    finally:
        holder.kill()
        holder.wait()
    assert report.computed["unet T=5"] == 8 and report.left_to_others == {"unet T=5": 1}
    lines = report.lines()
    assert "  unet T=5: 1 shards left to another process writing this store" in lines
    assert "  not complete yet (T=5: 1 shards to do): other --shard parts still to run or running" in lines
    assert open_cache(store).done(5).tolist() == [True] * 2 + [False] * 2 + [True] * 6
    # the holder is gone: the same command finishes the store, as the single-process run would
    again = run("refseg-extract", extract_args(synth_root, store), logs=tmp_path / "logs")
    assert again.exitcode == 0 and computed(again.stdout)["unet T=5"] == 2, again.stderr
    assert store_files(store) == store_files(extraction_reference)
