"""A sweep plans its heads before it writes anything (issue 23): count, passes, memory; `--dry-run`
prints the plan and writes nothing; heads split into several passes by a small memory budget are the
bytes of the one-pass sweep (each pass reads the same batches again)."""

from __future__ import annotations

import pytest
import yaml
from _heads_util import train_val_caches
from click.testing import CliRunner

from refseg.heads.cli_sweep import main as sweep_main
from refseg.heads.sweep import run_sweep

GRID = {"head": ["vpd", "film"], "seed": [0, 1], "noise_t": 5, "lr": "1e-3", "optimizer": "adam", "hidden": 8,
        "epochs": 2, "batch_size": 8, "preload": True}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("plan-caches"), 40, 16)


def _files(run):
    """The weights' bytes and the logged losses and val metrics (not the timings)."""
    from refseg.heads import run_dir

    logged = [(r["loss"], r["val"]) for r in run_dir.read_metrics(run)]
    return {name: (run / name).read_bytes() for name in ("head.safetensors", "best.safetensors")}, logged


def test_a_huge_grid_is_planned_quickly_and_a_dry_run_writes_nothing(caches, tmp_path, monkeypatch):
    """Quickly: each distinct head is built once (two kinds here), not once per head of the 10,000."""
    from refseg.heads import train_setup

    built = []
    build = train_setup.build_for_training
    monkeypatch.setattr(train_setup, "build_for_training", lambda *a, **k: built.append(a[0].head) or build(*a, **k))
    grid = dict(GRID, seed=list(range(5000)))  # 10,000 heads
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "s"
    result = CliRunner().invoke(sweep_main, ["--cache", str(caches[0]), "--val-cache", str(caches[1]), "--grid",
                                             str(tmp_path / "grid.yaml"), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert sorted(built) == ["film", "film", "vpd", "vpd"]  # the checks' build and the plan's, of each kind
    assert "sweep plan: 10000 heads (0 done already, 10000 to train) on 1 batch stream(s), in " in result.stdout
    assert "per head at most" in result.stdout and "pass 1: T=5, batch 8, " in result.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_heads_trained_in_several_passes_are_the_bytes_of_one_pass(caches, tmp_path, capsys):
    one = run_sweep(GRID, *caches, tmp_path / "one", progress=False)
    several = run_sweep(GRID, *caches, tmp_path / "several", progress=True, memory_budget=1)  # a head a pass
    said = capsys.readouterr().err  # the sweep's progress is on stderr
    assert "in 4 pass(es)" in said and "sweep pass 4/4: T=5, 1 heads (3 of 4 heads done before it, about " in said
    assert one == several
    for run in (tmp_path / "one" / "runs").iterdir():
        assert _files(run) == _files(tmp_path / "several" / "runs" / run.name), run.name
