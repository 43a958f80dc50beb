"""kill -9 of `refseg-extract` and `refseg-train-head` at the worst moments, then the same command
again (issue 7, point 1).

The store after the resumed runs must equal an uninterrupted run's byte for byte, and a reader that
polls the store while the killed and resumed processes write it must never see a sample flagged done
whose data is not final. A head training killed and continued with --resume must end with the
weights (and log) of an uninterrupted training.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _cache_util import store_files
from _heads_util import train_val_caches
from _fault_util import Fault, extract_args, extraction_reference, partial_files, run  # noqa: F401

from refseg.cache import open_cache
from refseg.core.errors import CacheError


class DoneWatcher(threading.Thread):
    """Polls a store while others write it; reads every sample (and latent, embedding) the moment it
    is flagged done and keeps what it read, to be compared with the final store."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.seen: dict[tuple, np.ndarray] = {}
        self.errors: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self):
        cache = None
        while not self._stop_event.is_set():
            try:
                if cache is None:
                    cache = open_cache(self.path)
                self._poll(cache)
            except CacheError:
                cache = None  # not created yet, or being created
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            time.sleep(0.02)

    def _poll(self, cache):
        for row in np.flatnonzero(cache.images_done()):
            self.seen.setdefault(("latent", int(row)), cache.latents([row])[0])
        for row in np.flatnonzero(cache.text_done()):
            self.seen.setdefault(("embedding", int(row)), cache.embeddings([row])[0])
        for t in cache.noise_levels:
            for row in np.flatnonzero(cache.done(t)):
                if (t, int(row)) not in self.seen:
                    self.seen[(t, int(row))] = cache.read(t, int(row))

    def stop(self):
        self._stop_event.set()
        self.join()


def test_kill_at_any_point_then_rerun_equals_an_uninterrupted_run(synth_root, extraction_reference, tmp_path):
    store = tmp_path / "C.zarr"
    args = extract_args(synth_root, store)
    logs = tmp_path / "logs"
    watcher = DoneWatcher(store)
    watcher.start()

    # 1. during the VAE stage: the third image is being decoded (the first batch of 2 was encoded)
    killed = run("refseg-extract", args, logs=logs, faults=[Fault("refseg.extract.pipeline:image_to_tensor", on_call=3)])
    assert killed.killed, killed.stderr
    cache = open_cache(store)
    assert not cache.text_done().any() and cache.noise_levels == []

    # 2. mid-shard: half-way through writing the s16 file of the second shard at T=0
    killed = run("refseg-extract", args, logs=logs,
                 faults=[Fault("refseg.cache.engine:start_write", "torn", match="t0000/s16/c/1/")])
    assert killed.killed, killed.stderr
    assert any(p.startswith("t0000/s16/c/1/") for p in partial_files(store))  # it did die inside the write
    assert open_cache(store).done(0).tolist() == [True] * 2 + [False] * 8  # shard 0 whole, shard 1 not flagged

    # 3. while flagging the first shard of T=5 done (its data is written, its flag file half)
    killed = run("refseg-extract", args, logs=logs,
                 faults=[Fault("zarr.storage._local:_put", "torn", match="t0005/done/c/0")])
    assert killed.killed, killed.stderr
    assert any(p.startswith("t0005/done/c/0") for p in partial_files(store))
    assert not any(p.startswith("t0000/") for p in partial_files(store))  # the rerun cleaned up step 2's
    cache = open_cache(store)
    assert cache.done(0).all() and not cache.done(5).any()

    # 4. between two shards: right after the first shard of T=5 was written and flagged
    killed = run("refseg-extract", args, logs=logs,
                 faults=[Fault("refseg.cache.writer:CacheWriter.write_features", after=True)])
    assert killed.killed, killed.stderr
    assert open_cache(store).done(5).tolist() == [True] * 2 + [False] * 8

    # 5. the same command, undisturbed, finishes the store
    finished = run("refseg-extract", args, logs=logs)
    watcher.stop()
    assert finished.exitcode == 0, finished.stderr
    assert "unet T=0: 0 computed this run" in finished.stdout and "unet T=5: 8 computed" in finished.stdout
    assert partial_files(store) == []
    assert store_files(store) == store_files(extraction_reference)

    # what the reader saw flagged done during all this was already the final data
    assert not watcher.errors, watcher.errors
    final = open_cache(store)
    assert len([k for k in watcher.seen if k[0] in (0, 5)]) >= 12  # it saw shards appear across the runs
    for key, got in watcher.seen.items():
        if key[0] == "latent":
            np.testing.assert_array_equal(got, final.latents([key[1]])[0])
        elif key[0] == "embedding":
            np.testing.assert_array_equal(got, final.embeddings([key[1]])[0])
        else:
            expected = final.read(*key)
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name], err_msg=str((key, name)))


# ---- refseg-train-head --resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("head-caches"), 32, 16)


def train_args(caches, out) -> list[str]:
    """film with AdamW and its per-iteration poly lr (so the iteration count must survive), 3 epochs of 4 steps."""
    train_cache, val_cache = caches
    return ["--cache", str(train_cache), "--val-cache", str(val_cache), "--noise-t", "5", "--head", "film",
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--hidden", "8", "--seed", "3"]


def _log(run_path: Path) -> list[tuple]:
    lines = (run_path / "metrics.jsonl").read_text().splitlines()
    return [(r["epoch"], r["iteration"], r["loss"], r["val"]) for r in map(json.loads, lines)]


def test_killed_head_training_resumes_to_the_weights_of_an_uninterrupted_one(head_caches, tmp_path):
    logs = tmp_path / "logs"
    straight = run("refseg-train-head", train_args(head_caches, tmp_path / "straight"), logs=logs)
    assert straight.exitcode == 0, straight.stderr
    out = tmp_path / "resumed"
    args = train_args(head_caches, out)

    # 1. right after epoch 1's checkpoint (its state file) was written
    killed = run("refseg-train-head", args, logs=logs, faults=[Fault("refseg.heads.run_dir:save_state", after=True)])
    assert killed.killed, killed.stderr
    assert [e[0] for e in _log(out)] == [1]

    # 2. resumed, then killed in the middle of epoch 2 (its second optimisation step)
    killed = run("refseg-train-head", args + ["--resume"], logs=logs,
                 faults=[Fault("refseg.heads.train:segmentation_loss", on_call=2)])
    assert killed.killed, killed.stderr
    assert "resuming" in killed.stdout and "after epoch 1/3" in killed.stdout

    # 3. resumed, then killed while epoch 2's state is being written: its weights and log line are
    #    already there, the state file (what --resume trusts) still says epoch 1
    killed = run("refseg-train-head", args + ["--resume"], logs=logs,
                 faults=[Fault("refseg.heads.run_dir:save_file", after=True, match=".state.safetensors.tmp")])
    assert killed.killed, killed.stderr
    assert [e[0] for e in _log(out)] == [1, 2] and (out / ".state.safetensors.tmp").exists()

    # 4. resumed to the end: epoch 2 again, then 3
    finished = run("refseg-train-head", args + ["--resume"], logs=logs)
    assert finished.exitcode == 0, finished.stderr
    assert "after epoch 1/3" in finished.stdout
    for name in ("head.safetensors", "best.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert _log(out) == _log(tmp_path / "straight")
    assert not list(out.glob(".*.tmp"))
