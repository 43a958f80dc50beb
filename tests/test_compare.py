"""refseg-compare (heads/compare.py): runs and sweeps in one table, grouped by the settings that
differ, seeds aggregated, recorded metrics or every run evaluated on every cache."""

import csv
import statistics

import pytest
from _cli_util import one_line_error
from _heads_util import make_cache, train_val_caches
from click.testing import CliRunner

from refseg.heads import evaluate, run_dir, train
from refseg.heads.cli_compare import main as compare_main
from refseg.heads.compare import compare
from refseg.heads.sweep import run_sweep

T = 5
GRID = {"head": "linear", "noise_t": T, "lr": [1e-3, 1e-2], "seed": [0, 1], "optimizer": "adam", "epochs": 2,
        "preload": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    train_cache, val_cache = train_val_caches(root, 32, 16)
    test_cache = root / "test.zarr"
    make_cache(test_cache, 12, split="test", seed=2)
    run_sweep(GRID, train_cache, val_cache, root / "sweep", progress=False)
    blind = root / "blind"
    train(train_cache, T, "film", blind, val_cache=val_cache, text_blind=True, epochs=2, hidden=8, lr=1e-3,
          optimizer="adam", preload=True, progress=False)
    return {"root": root, "train": train_cache, "val": val_cache, "test": test_cache, "sweep": root / "sweep",
            "blind": blind}


def _best(run):
    return max(run_dir.read_metrics(run), key=lambda r: r["val"]["oIoU"])["val"]


def test_a_sweep_is_grouped_by_what_differs_and_seeds_are_aggregated(setup):
    rows = compare([setup["sweep"]])
    assert [(r["lr"], r["n_runs"]) for r in rows] == [(1e-3, 2), (1e-2, 2)]
    assert set(rows[0]) == {"lr", "n_runs"} | {f"{m}_{s}" for m in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9",
                                                                    "oIoU", "mIoU") for s in ("mean", "std")}
    for row in rows:
        best = [_best(setup["sweep"] / "runs" / f"lr={row['lr']},seed={seed}") for seed in (0, 1)]
        assert row["oIoU_mean"] == pytest.approx(statistics.fmean(b["oIoU"] for b in best))
        assert row["mIoU_std"] == pytest.approx(statistics.stdev(b["mIoU"] for b in best))


def test_runs_and_sweeps_together_show_every_differing_setting(setup):
    rows = compare([setup["sweep"], setup["blind"]])
    assert list(rows[0])[:6] == ["head", "hidden", "norm", "tensors", "text_hidden", "text_blind"]
    assert [(r["head"], r["text_blind"], r["lr"], r["n_runs"]) for r in rows] == [
        ("linear", False, 1e-3, 2), ("linear", False, 1e-2, 2), ("film", True, 1e-3, 1)]
    assert rows[2]["oIoU_std"] == "" and rows[2]["oIoU_mean"] == pytest.approx(_best(setup["blind"])["oIoU"])


def test_caches_are_evaluated_per_run_with_columns_per_cache(setup):
    rows = compare([setup["sweep"], setup["blind"]], [setup["val"], setup["test"]], device="cpu")
    assert "val oIoU_mean" in rows[0] and "test P@0.5_mean" in rows[0]
    for row in rows[:2]:
        runs = [setup["sweep"] / "runs" / f"lr={row['lr']},seed={seed}" for seed in (0, 1)]
        scores = [evaluate(run, setup["test"]) for run in runs]
        assert row["test oIoU_mean"] == pytest.approx(statistics.fmean(s["oIoU"] for s in scores))
        # on the val cache the best checkpoint scores what training recorded for it
        assert row["val oIoU_mean"] == pytest.approx(statistics.fmean(_best(run)["oIoU"] for run in runs))
    # a text-blind run is evaluated as it was trained: with no sentence
    assert rows[2]["val oIoU_mean"] == pytest.approx(_best(setup["blind"])["oIoU"])


def test_the_command_prints_markdown_and_writes_csv(setup, tmp_path):
    out = tmp_path / "table.csv"
    result = CliRunner().invoke(compare_main, [str(setup["sweep"]), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| lr | n_runs | P@0.5 |") and len(lines) == 4
    table = list(csv.DictReader(open(out)))
    assert [(r["lr"], r["n_runs"]) for r in table] == [("0.001", "2"), ("0.01", "2")]
    one_line_error(CliRunner().invoke(compare_main, [str(setup["sweep"]), "--out", str(tmp_path / "t.txt")]),
                   "must end in .md or .csv")
    (tmp_path / "empty").mkdir()
    one_line_error(CliRunner().invoke(compare_main, [str(tmp_path / "empty")]),
                   "neither a head run directory", "nor a sweep directory")
    one_line_error(CliRunner().invoke(compare_main, [str(tmp_path / "missing")]), "does not exist")
