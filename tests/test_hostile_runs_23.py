"""Head runs on hostile ground (issue 23): a cache holding NaN is named as the cause of a diverged run
(not --lr), a training or a sweep's pass that fails before its first epoch leaves no folder that looks
like a run, a sweep's heads are labelled in every pass and its progress is on stderr, and the commands
say where they wrote as their last line on stderr (nothing with --quiet)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from _heads_util import make_cache, train_val_caches
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.cache.writer import CacheWriter
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_sweep import main as sweep_main
from refseg.heads.cli_train import main as train_main
from refseg.heads.sweep import run_sweep

T = 5
ROW = 11  # the sample whose values are not finite
FAST = ["--epochs", "1", "--hidden", "8", "--lr", "1e-3", "--optimizer", "adam", "--quiet"]
GRID = {"head": ["vpd", "linear"], "noise_t": T, "lr": "1e-3", "optimizer": "adam", "hidden": 8, "epochs": 1,
        "batch_size": 8, "preload": True}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("hostile-runs-23"), 24, 8)


def _poisoned_cache(path, monkeypatch, tensor: str) -> int:
    """A cache whose row ROW holds NaN in `tensor` (as a damaged store, or one written by another tool, can:
    refseg's writer refuses NaN, so its check is passed by here); -> that row's sent_id."""
    write_features, write_text = CacheWriter.write_features, CacheWriter.write_text

    def features(self, t, rows, arrays, skipped=None, checked=False):
        if tensor in arrays and rows.start <= ROW < rows.stop:
            arrays = dict(arrays, **{tensor: arrays[tensor].copy()})
            arrays[tensor][ROW - rows.start] = np.nan
        return write_features(self, t, rows, arrays, skipped, checked=True)

    def text(self, rows, input_ids, attention_mask, embedding, gt, *rest):
        if tensor == "text/embedding" and rows.start <= ROW < rows.stop:
            embedding = embedding.copy()
            embedding[ROW - rows.start] = np.nan
        return write_text(self, rows, input_ids, attention_mask, embedding, gt, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(CacheWriter, "write_features", features)
        patch.setattr(CacheWriter, "write_text", text)
        patch.setattr(CacheWriter, "_check_finite", lambda *a, **k: None)
        make_cache(path, 24, split="train", seed=0)
    return int(open_cache(path).index["sent_id"][ROW])


@pytest.mark.parametrize("tensor, head, preload", [("s16", "vpd", "--preload"), ("text/embedding", "film", "--no-preload")])
def test_a_cache_holding_nan_is_named_as_the_cause_not_the_lr(tmp_path, monkeypatch, tensor, head, preload):
    store = tmp_path / "nan.zarr"
    sent_id = _poisoned_cache(store, monkeypatch, tensor)
    out = tmp_path / "runs" / "r"
    result = CliRunner().invoke(train_main, ["--cache", str(store), "--noise-t", str(T), "--head", head,
                                             "--out", str(out), preload, *FAST])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: training diverged in epoch 1: the loss is nan because cache {store} holds non-finite values in "
        f"sample sent_id {sent_id} (tensor {tensor} at T={T}): run `refseg-cache verify {store}`; no epoch was saved"]
    assert not (tmp_path / "runs").exists()  # the folders it made are taken away: nothing looks like a run


def test_a_sweep_pass_that_fails_before_its_first_epoch_leaves_no_run_folders(caches, tmp_path):
    """A truncated shard met with preload off: the pass's new runs (config.json alone) are taken away."""
    import shutil

    store = tmp_path / "train.zarr"
    shutil.copytree(caches[0], store)
    shard = sorted(p for p in (store / "t0005" / "s8" / "c").rglob("*") if p.is_file())[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(dict(GRID, preload=False)))
    result = CliRunner().invoke(sweep_main, ["--cache", str(store), "--val-cache", str(caches[1]), "--grid",
                                             str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 2 and "t0005/s8" in result.stderr, result.output
    assert sorted(p.name for p in (tmp_path / "s" / "runs").iterdir()) == []


def test_a_sweeps_heads_are_labelled_in_passes_of_one_and_its_progress_is_on_stderr(caches, tmp_path, capsys):
    run_sweep(GRID, *caches, tmp_path / "s", progress=True, memory_budget=1)  # a head a pass
    said = capsys.readouterr()
    epochs = [line for line in said.out.splitlines() if ": epoch 1: loss " in line]
    assert [line.split(":")[0] for line in epochs] == ["head=vpd", "head=linear"], said.out
    started = [line for line in said.out.splitlines() if " training " in line]
    assert [line.split(": training ")[0] for line in started] == ["head=vpd", "head=linear"], said.out
    assert "sweep pass 1/2: T=5, 1 heads (0 of 2 heads done before it)" in said.err.splitlines()
    assert "sweep pass" not in said.out


def test_sweep_and_eval_say_where_they_wrote_last_on_stderr_and_nothing_with_quiet(caches, tmp_path):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(dict(GRID, head="linear")))
    sweep = ["--cache", str(caches[0]), "--val-cache", str(caches[1]), "--grid", str(tmp_path / "grid.yaml")]
    out = tmp_path / "s"
    result = CliRunner().invoke(sweep_main, [*sweep, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == (f"wrote {out / 'summary.md'}, {out / 'summary.csv'} and a run directory "
                                             f"per head under {out / 'runs'} (refseg-eval --run reads each)")
    assert "wrote" not in result.stdout  # stdout holds the summary table alone
    quiet = CliRunner().invoke(sweep_main, [*sweep, "--out", str(tmp_path / "q"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output

    run = out / "runs" / "run"
    evaluated = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(caches[1]), "--json",
                                               str(tmp_path / "e.json"), "--per-sample", str(tmp_path / "e.csv")])
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stderr.splitlines()[-1] == f"wrote {tmp_path / 'e.json'}, {tmp_path / 'e.csv'}"
    assert json.loads((tmp_path / "e.json").read_text())["summary"]["n"] == 8
    quiet = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(caches[1]), "--json",
                                           str(tmp_path / "q.json"), "--quiet"])
    assert quiet.exit_code == 0 and "wrote" not in quiet.stderr and (tmp_path / "q.json").is_file(), quiet.output


# ---- a full disk: each command's own advice ----------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A real disk with no room left: a 16 KiB tmpfs holding a 16 KiB file."""
    from _disk_util import small_tmpfs

    with small_tmpfs(tmp_path, "16k", fill_to_kib=16) as mount:
        yield mount


def test_an_evaluation_json_onto_a_full_disk_says_so_without_resume_advice(caches, tmp_path, full_disk):
    run = tmp_path / "run"
    trained = CliRunner().invoke(train_main, ["--cache", str(caches[0]), "--noise-t", str(T), "--head", "linear",
                                              "--out", str(run), *FAST])
    assert trained.exit_code == 0, trained.output
    out = full_disk / "e.json"
    result = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(caches[1]), "--checkpoint", "last",
                                            "--json", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: writing {out} failed: No space left on device (ENOSPC); nothing of it was kept (a file there before "
        "is whole): free space, then run the command again"]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    csv = full_disk / "e.csv"  # written whole or not at all: no CSV cut short
    result = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(caches[1]), "--checkpoint", "last",
                                            "--per-sample", str(csv), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: writing {csv} failed: No space left"), result.output
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_a_sweep_onto_a_full_disk_says_its_own_command_resumes(caches, tmp_path):
    """A run's file fails in a sweep: the sweep resumes by its own command (it has no --resume)."""
    from _disk_util import small_tmpfs

    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(dict(GRID, head="vpd", hidden=64)))
    with small_tmpfs(tmp_path, "64k", fill_to_kib=48) as disk:
        out = disk / "s"
        result = CliRunner().invoke(sweep_main, ["--cache", str(caches[0]), "--val-cache", str(caches[1]), "--grid",
                                                 str(tmp_path / "grid.yaml"), "--out", str(out), "--quiet"])
        assert result.exit_code == 2, result.output
        line, = result.stderr.splitlines()
        assert line.startswith(f"error: writing run {out / 'runs' / 'run'} failed: No space left on device (ENOSPC) at ")
        assert line.endswith("the heads' completed epochs are kept: free space, then rerun the same refseg-sweep "
                             "command (it resumes each head after its last completed epoch)"), line
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
