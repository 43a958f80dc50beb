"""Guard rails of head runs (issue 14): nothing silently wrong, nothing lost.

Incomplete caches are refused (or used with the coverage recorded), a val cache holding the training
samples is refused and an evaluation on them is flagged, two trainers cannot share a run directory,
a checkpoint fallback is said, every numeric option and output path is checked before anything is
created, misplaced paths are named for what they are, and run files get the mode open() would give.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_util import one_line_error as _one_line_error
from _heads_util import make_cache
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.cache.cli import main as cache_main
from refseg.core.errors import CacheError, RunError
from refseg.heads import evaluate, run_dir, train
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main

T = 5
FAST = dict(epochs=1, batch_size=8, lr=1e-3, optimizer="adam", hidden=8, progress=False)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """train (16, complete), val (16, complete), part: 32 val-split samples of which shards 0-1 are
    written (16 rows, row 3 skipped as bad: 15 done of 31), allbad: complete but for one skipped row."""
    root = tmp_path_factory.mktemp("guard-runs")
    make_cache(root / "train.zarr", 16, split="train", seed=0)
    make_cache(root / "val.zarr", 16, split="val", seed=1)
    make_cache(root / "part.zarr", 32, split="test", seed=1, feature_shards=2, skipped_rows=[3])
    make_cache(root / "skipped.zarr", 16, split="test", seed=2, skipped_rows=[5])
    train(root / "train.zarr", T, "vpd", root / "run", val_cache=root / "val.zarr", **FAST)
    train(root / "train.zarr", T, "vpd", root / "noval", **FAST)
    return root



def _train(cache, out, *extra, head="vpd"):
    return CliRunner().invoke(train_main, ["--cache", str(cache), "--noise-t", str(T), "--head", head, "--out", str(out),
                                           "--epochs", "1", "--hidden", "8", "--lr", "1e-3", "--optimizer", "adam",
                                           *extra])


def _eval(run, cache, *extra):
    return CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(cache), *extra])


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- 1. incomplete caches -------------------------------------------------------------------------
def test_an_incomplete_noise_level_is_refused_by_train_and_eval(caches, tmp_path):
    expected = ("is incomplete at noise T=5: 15 of 31 samples (48.4%; 1 more skipped as bad) done, 16 missing",
                "run the same refseg-extract command again", "--out " + str(caches / "part.zarr"),
                "--allow-incomplete")
    out = tmp_path / "deep" / "run"
    _one_line_error(_train(caches / "part.zarr", out), "cache " + str(caches / "part.zarr"), *expected)
    assert not (tmp_path / "deep").exists()
    _one_line_error(_train(caches / "train.zarr", out, "--val-cache", str(caches / "part.zarr")),
                    "val cache " + str(caches / "part.zarr"), *expected)
    assert not (tmp_path / "deep").exists()
    _one_line_error(_eval(caches / "run", caches / "part.zarr"), *expected)
    with pytest.raises(CacheError, match="15 of 31 samples"):
        evaluate(caches / "run", caches / "part.zarr")


def test_skipped_samples_are_not_missing(caches, tmp_path):
    # every sample is done but one recorded as bad: the level is complete, no flag needed
    assert open_cache(caches / "skipped.zarr").coverage(T).complete
    result = _train(caches / "skipped.zarr", tmp_path / "run")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["cache"]["coverage"] == {"noise_t": 5, "samples": 16, "done": 15, "skipped": 1, "missing": 0,
                                        "fraction": 1.0, "complete": True}
    assert cfg["cache"]["samples"] == 15


def test_allow_incomplete_records_the_coverage(caches, tmp_path):
    coverage = {"noise_t": 5, "samples": 32, "done": 15, "skipped": 1, "missing": 16, "fraction": 15 / 31,
                "complete": False}
    result = _train(caches / "part.zarr", tmp_path / "run", "--allow-incomplete")
    assert result.exit_code == 0, result.output
    assert "warning: cache " in result.stderr and "15 of 31 samples (48.4%" in result.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["cache"]["coverage"] == coverage and cfg["cache"]["samples"] == 15
    assert cfg["val_cache_coverage"] is None

    # an incomplete val cache: config.json, the printed JSON and the val table's header say so
    result = _train(caches / "train.zarr", tmp_path / "run2", "--val-cache", str(caches / "part.zarr"),
                    "--allow-incomplete")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert cfg["val_cache_coverage"] == coverage and cfg["cache"]["coverage"]["complete"] is True
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Noise |"))
    assert lines[header - 1] == "Caveats: incomplete val cache: 15 of 31 samples (48.4%; 1 more skipped as bad)"
    assert json.loads(lines[-1])["coverage"]["val_cache"] == coverage

    result = _eval(caches / "run", caches / "part.zarr", "--allow-incomplete", "--json", str(tmp_path / "e.json"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines.index("| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |")
    assert lines[header - 1] == "Caveats: incomplete cache: 15 of 31 samples (48.4%; 1 more skipped as bad) at T=5"
    assert "warning: cache " in result.stderr and "evaluating 15 of 31 samples" in result.stderr
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["coverage"] == coverage and info["summary"]["n"] == 15
    assert any("15 of 31 samples" in w for w in info["warnings"])


def test_cache_info_shows_the_coverage_of_each_level(caches):
    result = CliRunner().invoke(cache_main, ["info", str(caches / "part.zarr")])
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.strip().startswith("T=5 ")]
    assert line.split()[:3] == ["T=5", "timestep", "5"]  # then the noise (ᾱ, SNR: refseg_core/noise.py), then:
    assert line.endswith("done 15/32, skipped 1, coverage 48.4% of the 31 not skipped: incomplete, 16 missing")
    result = CliRunner().invoke(cache_main, ["info", str(caches / "train.zarr")])
    assert "done 16/16, coverage 100.0%: complete" in result.output


# ---- 2. splits mixed up ---------------------------------------------------------------------------
def test_a_val_cache_holding_the_training_samples_is_refused(caches, tmp_path):
    train_cache = caches / "train.zarr"
    copy = tmp_path / "copy.zarr"
    shutil.copytree(train_cache, copy)
    link = tmp_path / "link.zarr"
    link.symlink_to(train_cache)
    subset = tmp_path / "subset.zarr"
    make_cache(subset, 6, split="train", seed=5)  # the first 6 sentences of the training split
    out = tmp_path / "run"
    for val in (train_cache, copy, link, str(train_cache) + "/"):
        _one_line_error(_train(train_cache, out, "--val-cache", str(val)),
                        f"val cache {Path(val)} holds the same samples as the training cache {train_cache}",
                        "pass a cache of another split as --val-cache")
    _one_line_error(_train(train_cache, out, "--val-cache", str(subset)),
                    f"val cache {subset} holds 6 of its 6 samples from the training cache")
    assert not out.exists()


def test_evaluating_on_the_training_samples_warns_and_is_recorded(caches, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(caches / "train.zarr", copy)
    for cache in (caches / "train.zarr", copy):
        result = _eval(caches / "run", cache, "--json", str(tmp_path / "e.json"))
        assert result.exit_code == 0, result.output
        warning = [line for line in result.stderr.splitlines() if "samples it was trained on" in line]
        assert warning == [f"warning: evaluating run {caches / 'run'} on samples it was trained on: cache {cache} is "
                           "the run's training cache (the same fingerprint); these numbers measure the fit to the "
                           "training data, not generalisation"]
        assert "Caveats: on the run's training samples" in result.stdout
        assert json.loads((tmp_path / "e.json").read_text())["on_training_samples"] is True
    # another cache of the training split (a different --limit): the same split of the same dataset
    other = tmp_path / "other.zarr"
    make_cache(other, 4, split="train", seed=3)
    result = _eval(caches / "run", other)
    assert "is of the split the run was trained on (unc 'train')" in result.stderr
    result = _eval(caches / "run", caches / "val.zarr", "--json", str(tmp_path / "v.json"))
    assert result.exit_code == 0 and "warning" not in result.stderr and "Caveats" not in result.stdout
    info = json.loads((tmp_path / "v.json").read_text())
    assert info["on_training_samples"] is False and info["warnings"] == []


# ---- 3. two trainers on one --out ----------------------------------------------------------------
# Trainer A pauses at the end of its first epoch (after set-up wrote config.json, holding the lock)
# until the test opens the gate; trainer B starts meanwhile.
GATED_TRAINER = r"""
import importlib, os, sys, time
train_module = importlib.import_module("refseg.heads.train")
gate, ready = sys.argv[1], sys.argv[2]
end_epoch = train_module.end_epoch
def gated(*args, **kwargs):
    open(ready, "w").close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    return end_epoch(*args, **kwargs)
train_module.end_epoch = gated
from refseg.heads.cli_train import main
main(args=sys.argv[3:])
"""
TRAINER = "import sys; from refseg.heads.cli_train import main; main(args=sys.argv[1:])"


def test_two_trainers_on_one_run_directory(caches, tmp_path):
    out = tmp_path / "run"
    args = ["--cache", str(caches / "train.zarr"), "--val-cache", str(caches / "val.zarr"), "--noise-t", str(T),
            "--head", "vpd", "--out", str(out), "--epochs", "2", "--hidden", "8", "--lr", "1e-3", "--optimizer",
            "adam", "--batch-size", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    gate, ready = tmp_path / "gate", tmp_path / "ready"
    first = subprocess.Popen([sys.executable, "-c", GATED_TRAINER, str(gate), str(ready), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first trainer did not reach its first epoch's end"
            time.sleep(0.1)
        before = _files(out)
        assert "config.json" in before
        for extra in ([], ["--resume"]):
            second = subprocess.run([sys.executable, "-c", TRAINER, *args, *extra], env=env, capture_output=True,
                                    text=True, timeout=300)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert lines == [f"error: run directory {out} is being written by another training process right now: "
                             "wait for it to finish, or choose another --out"], second.stderr
            assert _files(out) == before  # the second trainer changed nothing
        gate.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert [r["epoch"] for r in run_dir.read_metrics(out)] == [1, 2]
    assert json.loads((out / "config.json").read_bytes()) == json.loads(before["config.json"])
    assert _eval(out, caches / "val.zarr").exit_code == 0
    # the lock went with the first trainer: the directory takes a --resume now
    train(caches / "train.zarr", T, "vpd", out, val_cache=caches / "val.zarr", resume=True,
          **dict(FAST, epochs=3))
    assert [r["epoch"] for r in run_dir.read_metrics(out)] == [1, 2, 3]


def test_the_run_lock_keeps_two_trainers_of_one_process_apart(tmp_path):
    lock = run_dir.RunLock(tmp_path)
    with pytest.raises(RunError, match="is being written by another training process"):
        run_dir.RunLock(tmp_path)
    lock.release()
    run_dir.RunLock(tmp_path).release()
    assert list(tmp_path.iterdir()) == []  # a lock on the folder itself: no lock file


# ---- 4. checkpoint fallback -----------------------------------------------------------------------
def test_a_checkpoint_fallback_is_said(caches, tmp_path):
    result = _eval(caches / "noval", caches / "val.zarr", "--json", str(tmp_path / "e.json"))
    assert result.exit_code == 0, result.output
    assert (f"warning: run {caches / 'noval'} has no best.safetensors (it was trained without --val-cache): "
            "evaluating the last epoch's weights, head.safetensors, instead") in result.stderr.splitlines()
    assert "Caveats: checkpoint last, not best" in result.stdout
    info = json.loads((tmp_path / "e.json").read_text())
    assert (info["checkpoint"], info["checkpoint_requested"]) == ("last", "best")
    # asked for last: nothing to say
    result = _eval(caches / "noval", caches / "val.zarr", "--checkpoint", "last")
    assert result.exit_code == 0 and "warning" not in result.stderr and "Caveats" not in result.stdout
    # trained with a val cache, but best.safetensors is gone
    run = tmp_path / "run"
    shutil.copytree(caches / "run", run)
    (run / "best.safetensors").unlink()
    result = _eval(run, caches / "val.zarr")
    assert "has no best.safetensors (the file is missing)" in result.stderr


# ---- 5. numbers and output paths checked before anything is created ------------------------------
@pytest.mark.parametrize("option, value, says", [
    ("--lr", "-1", "--lr must be a finite number above 0, got -1.0"),
    ("--lr", "nan", "--lr must be a finite number above 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number above 0, got inf"),
    ("--lr", "0", "--lr must be a finite number above 0, got 0.0"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--batch-size", "-8", "--batch-size must be at least 1, got -8"),
    ("--hidden", "0", "--hidden must be from 1 to 4096, got 0"),
    ("--hidden", "1000000000", "--hidden must be from 1 to 4096, got 1000000000"),
    ("--workers", "-1", "--workers must be from 0 to 64, got -1"),
    ("--eval-every", "0", "--eval-every must be at least 1, got 0"),
    ("--max-samples", "0", "--max-samples must be at least 1, got 0"),
    ("--seed", "-1", "--seed must be from 0 to 4294967295, got -1"),
    ("--noise-t", "-1", "--noise-t must be from 0 to 9999, got -1"),
    ("--noise-t", "10000", "--noise-t must be from 0 to 9999, got 10000"),
])
def test_bad_numbers_for_training_leave_nothing(caches, tmp_path, option, value, says):
    out = tmp_path / "a" / "run"
    result = CliRunner().invoke(train_main, ["--cache", str(caches / "train.zarr"), "--noise-t", str(T), "--head",
                                             "vpd", "--out", str(out), option, value])
    _one_line_error(result, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, says", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--max-overlays", "-1", "--max-overlays must be at least 0, got -1"),
    ("--noise-t", "-5", "--noise-t must be from 0 to 9999, got -5"),
])
def test_bad_numbers_for_evaluation(caches, tmp_path, option, value, says):
    result = _eval(caches / "run", caches / "val.zarr", "--allow-noise-mismatch", "--json", str(tmp_path / "e.json"),
                   option, value)
    _one_line_error(result, says)
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_checked_before_evaluating(caches, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    run = tmp_path / "run"
    shutil.copytree(caches / "run", run)
    config = (run / "config.json").read_bytes()
    json_out = tmp_path / "e.json"
    for extra, says in [
        (["--per-sample", "/proc/x.csv"], "--per-sample /proc/x.csv cannot be written: creating a file in /proc fails"),
        (["--per-sample", str(a_file / "x.csv")], f"cannot be created: {a_file} is a file, not a folder"),
        (["--overlays", str(a_file)], f"--overlays {a_file} is a file, not a folder"),
        (["--per-sample", str(tmp_path)], f"--per-sample {tmp_path} is a folder, not a file"),
        (["--per-sample", str(run / "config.json")], f"would overwrite the run {run}"),
        (["--per-sample", str(run / "best.safetensors")], f"would overwrite the run {run}"),
        (["--overlays", str(caches / "val.zarr" / "png")], f"would overwrite the cache {caches / 'val.zarr'}"),
        (["--per-sample", str(json_out)], f"--per-sample and --json are the same path {json_out}"),
    ]:
        _one_line_error(_eval(run, caches / "val.zarr", "--json", str(json_out), *extra), says)
        assert not json_out.exists()  # refused before the evaluation: the valid output was not written either
    assert (run / "config.json").read_bytes() == config
    # new files in the run folder are fine (refseg-report demo writes its eval there)
    result = _eval(run, caches / "val.zarr", "--json", str(run / "eval.json"), "--per-sample", str(run / "val.csv"))
    assert result.exit_code == 0, result.output


def test_a_diverged_training_stops_before_saving_the_epoch(caches, tmp_path, monkeypatch):
    train_module = sys.modules["refseg.heads.train"]  # the module: refseg.heads.train is also the function
    monkeypatch.setattr(train_module, "segmentation_loss",
                        lambda logits, *a, **k: logits.sum() * float("nan"))
    with pytest.raises(RunError, match=r"training diverged in epoch 1: the loss is nan \(the cache's inputs to the head "
                                       r"are finite\); no epoch was saved; try a lower --lr$"):
        train(caches / "train.zarr", T, "vpd", tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()  # no folder holding config.json alone, looking like a run


def test_resuming_on_other_samples_is_refused(caches, tmp_path):
    run = tmp_path / "run"
    train(caches / "train.zarr", T, "vpd", run, **dict(FAST, max_samples=16))
    kw = dict(FAST, epochs=2, resume=True)
    with pytest.raises(RunError, match="was trained on 16 samples of its cache, not 12"):
        train(caches / "train.zarr", T, "vpd", run, **dict(kw, max_samples=12))


# ---- 6. paths named for what they are --------------------------------------------------------------
def test_misplaced_run_and_cache_paths_say_what_they_are(caches, synth_root, tmp_path):
    run, val = caches / "run", caches / "val.zarr"
    _one_line_error(_eval(run / "config.json", val),
                    f"run {run / 'config.json'} is a file, not a run directory: pass its folder, --run {run}")
    _one_line_error(_eval(val, val), f"{val} is not a head run directory (no config.json): it is a Zarr store "
                                     "(a cache? pass it as --cache)")
    _one_line_error(_eval(run, run), f"{run} is a head run directory (written by refseg-train-head), not a cache")
    _one_line_error(_eval(run, run / "head.safetensors"), "is a file of a head run directory, not a cache")
    _one_line_error(_eval(run, val / "zarr.json"), "is a file (Zarr metadata inside a store), not a cache")
    dataset = synth_root / "refcoco-synth"
    _one_line_error(_eval(run, dataset), f"{dataset} is a dataset folder, not a cache")
    _one_line_error(_train(run / "config.json", tmp_path / "r"), "is a file of a head run directory, not a cache")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(_train(caches / "train.zarr", a_file), f"--out {a_file} is a file, not a folder")
    _one_line_error(_train(caches / "train.zarr", a_file / "run"), f"{a_file} is a file, not a folder")
    assert a_file.read_text() == "x"


# ---- 7. file modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_run_files_get_the_mode_open_would_give(caches, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        train(caches / "train.zarr", T, "vpd", tmp_path / "run", val_cache=caches / "val.zarr", **FAST)
        evaluate(tmp_path / "run", caches / "val.zarr", json_out=tmp_path / "e.json")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "run").iterdir()) + [tmp_path / "e.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


def test_a_run_recorded_before_the_tiny_synth_kind_rename_still_matches_its_caches():
    from refseg.core.errors import CacheMismatchError
    from refseg.heads.caches import check_compatible

    old_run = {"backbone": {"model": "tiny-synth", "kind": "folder", "weights_sha256": "w"}, "extraction": {}}
    new_cache = {"backbone": {"model": "tiny-synth", "kind": "tiny-synth", "weights_sha256": "w"}, "extraction": {}}
    check_compatible(old_run, new_cache, "run", "cache")
    check_compatible(new_cache, old_run, "run", "cache")
    other = {"backbone": {"model": "tiny-synth", "kind": "file", "weights_sha256": "w"}, "extraction": {}}
    # named as today (issue 23): a run recorded under the former kind 'folder' is shown as tiny-synth
    with pytest.raises(CacheMismatchError, match="backbone.kind is 'file' in the cache but 'tiny-synth' in the run"):
        check_compatible(old_run, other, "run", "cache")


def test_eval_of_a_cache_with_samples_skipped_as_bad_says_how_many_it_scored(caches, tmp_path):
    """Issue 23: 15 of 16 sentences scored, and which one was skipped, in the output and in --json."""
    out = tmp_path / "e.json"
    result = _eval(caches / "run", caches / "skipped.zarr", "--json", str(out))
    assert result.exit_code == 0, result.output
    skipped_id = int(open_cache(caches / "skipped.zarr").index["sent_id"][5])
    assert (f"scored 15 of 16 sentences; 1 skipped as bad at extraction (sent_ids {skipped_id}) count in no metric"
            in result.stdout), result.stdout
    assert result.stderr.strip().splitlines()[-1] == f"wrote {out}"  # where it wrote: the last line, on stderr
    info = json.loads(out.read_text())
    assert info["summary"]["n"] == 15 and info["skipped_as_bad"] == [skipped_id]


def test_training_names_the_epoch_it_kept_and_a_diverged_run_points_at_the_lr(caches, tmp_path):
    result = _train(caches / "train.zarr", tmp_path / "run", "--val-cache", str(caches / "val.zarr"), "--epochs", "2")
    assert result.exit_code == 0, result.output
    best = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = max(r["epoch"] for r in best if r.get("best"))
    assert f"kept epoch {epoch} (val oIoU " in result.stdout and f"{tmp_path / 'run'}/best.safetensors" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["best_epoch"] == epoch  # the JSON line stays last
    diverged = _train(caches / "train.zarr", tmp_path / "nan", "--lr", "1e30")  # overflows to NaN at once
    assert diverged.exit_code == 2 and "training diverged in epoch 1" in diverged.stderr, diverged.output
    assert "try a lower --lr" in diverged.stderr and "refseg-cache verify" not in diverged.stderr  # the cache is sound
