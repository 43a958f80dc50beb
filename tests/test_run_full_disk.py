"""`refseg-train-head` onto a full disk (issue 23): one line naming the run, the file and ENOSPC, exit 2;
nothing half-written is left; after space is freed, --resume ends with the bytes of an uninterrupted run."""

from __future__ import annotations

import errno

import pytest
import torch
from _disk_util import small_tmpfs
from click.testing import CliRunner

from refseg.core.errors import RunWriteError
from refseg.heads import run_dir


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path, "64k") as mount:
        yield mount


def test_weights_onto_a_full_disk_are_one_error_and_no_debris(small_disk):
    run = small_disk / "run"
    run.mkdir()
    run_dir.save_weights(run / "head.safetensors", {"w": torch.zeros(4)})
    before = (run / "head.safetensors").read_bytes()
    with pytest.raises(RunWriteError) as err:
        run_dir.save_weights(run / "head.safetensors", {"w": torch.zeros(64 * 1024)})  # 256 KB: does not fit
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith(f"writing run {run} failed: No space left on device (ENOSPC) at {run}/head")
    assert str(err.value).endswith("free space, then rerun the same command with --resume")
    assert sorted(p.name for p in run.iterdir()) == ["head.safetensors"]  # no .tmp left
    assert (run / "head.safetensors").read_bytes() == before  # the previous epoch's file intact
    with pytest.raises(RunWriteError, match="ENOSPC"):
        run_dir.write_json(run / "config.json", {"pad": "x" * 100_000})


def test_a_metrics_line_cut_short_is_left_out(tmp_path):
    (tmp_path / run_dir.METRICS).write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    assert run_dir.read_metrics(tmp_path) == [{"epoch": 1, "loss": 0.5}]
    (tmp_path / run_dir.METRICS).write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(Exception, match="is not a metrics log"):
        run_dir.read_metrics(tmp_path)


def test_training_onto_a_full_disk_exits_2_with_one_line(small_disk, tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _cache_util import filled_store

    from refseg.heads.cli_train import main as train_main

    store, _, _ = filled_store(tmp_path / "c.zarr")
    (small_disk / "filler").write_bytes(b"\0" * 48 * 1024)
    result = CliRunner().invoke(train_main, ["--cache", str(store), "--noise-t", "0", "--head", "vpd", "--hidden", "64",
                                             "--epochs", "2", "--out", str(small_disk / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: writing run {small_disk / 'run'} failed: No space left on device (ENOSPC)")
    # the first epoch could not be saved: the run folder it made is taken away (no .tmp, no config.json alone)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
