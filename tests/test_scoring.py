"""One scoring path (heads/scoring.py, issue 25 §2): the val metrics training logs are, to the last
bit, what refseg-eval prints for the same checkpoint on the same cache, for one head and for the
heads of a sweep validated together; and a multi-head pass scores each head as it would be alone."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from _heads_util import train_val_caches
from click.testing import CliRunner
from torch.utils.data import DataLoader

from refseg.cache import FeatureDataset, open_cache
from refseg.core.metrics import format_table
from refseg.heads import batches, build_head, compare, evaluate, run_dir, train
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.scoring import score
from refseg.heads.sweep import run_sweep

T = 5


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("scoring-caches"), 48, 20)


def _eval_cli(run, cache, checkpoint, tmp_path) -> tuple[dict, str]:
    """refseg-eval's JSON summary and its printed table line for `run`'s `checkpoint` on `cache`."""
    out = tmp_path / f"{run.name}-{checkpoint}.json"
    result = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(cache), "--checkpoint", checkpoint,
                                            "--json", str(out), "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| T={T} |"))
    return json.loads(out.read_text())["summary"], row


def _logged(run) -> tuple[dict, dict]:
    """(the best epoch's val metrics, the last epoch's), as metrics.jsonl holds them."""
    log = run_dir.read_metrics(run)
    return max(log, key=lambda r: r["val"]["oIoU"])["val"], log[-1]["val"]


def _assert_logged_equals_eval(run, cache, tmp_path) -> None:
    for checkpoint, logged in zip(("best", "last"), _logged(run)):
        summary, row = _eval_cli(run, cache, checkpoint, tmp_path)
        assert summary == logged, (run.name, checkpoint)  # exact: every float to the last bit, and n
        assert row == format_table([(f"T={T}", logged)]).splitlines()[-1]  # and the printed line


# a training batch above refseg-eval's 16: validation still scores in refseg-eval's batches
@pytest.mark.parametrize("head, batch_size", [("film", 24), ("vpd", 8)])
def test_trainings_logged_val_metrics_are_refseg_evals(caches, tmp_path, head, batch_size):
    train_cache, val_cache = caches
    run = tmp_path / head
    train(train_cache, T, head, run, val_cache=val_cache, epochs=3, batch_size=batch_size, hidden=8, lr=1e-3,
          optimizer="adam", preload=True, progress=False)
    assert [r["val"]["n"] for r in run_dir.read_metrics(run)] == [20, 20, 20]
    _assert_logged_equals_eval(run, val_cache, tmp_path)


def test_validation_reads_the_val_set_in_refseg_evals_batches(caches, tmp_path, monkeypatch):
    """On the CPU a head's logits differ in their last bits with the batch they are computed in (a
    pixel at a margin of 1e-8 can flip): validation batches the val set as refseg-eval does, not as
    training batches the training set."""
    train_cache, val_cache = caches
    made = []

    def recording(dataset, **kwargs):
        made.append((Path(dataset.path).name, kwargs.get("batch_size")))
        return DataLoader(dataset, **kwargs)

    monkeypatch.setattr(batches, "DataLoader", recording)
    train(train_cache, T, "linear", tmp_path / "run", val_cache=val_cache, epochs=1, batch_size=24, lr=1e-3,
          optimizer="adam", preload=True, progress=False)
    evaluate(tmp_path / "run", val_cache, device="cpu")
    assert made == [("train.zarr", None), ("val.zarr", 16), ("val.zarr", 16)]  # (training: its batch sampler)


@pytest.fixture(scope="module")
def sweep(caches, tmp_path_factory):
    """vpd, film and a text-blind film trained together: one val pass scores all three each epoch."""
    out = tmp_path_factory.mktemp("scoring-sweep")
    grid = {"head": ["vpd", "film"], "text_blind": [False, True], "noise_t": T, "hidden": 8, "epochs": 2,
            "lr": 1e-3, "optimizer": "adam", "preload": True}
    run_sweep(grid, *caches, out, progress=False)
    return sorted((out / "runs").iterdir())


def test_a_sweeps_heads_validated_together_log_what_refseg_eval_gives_each(sweep, caches, tmp_path):
    assert len(sweep) == 4
    for run in sweep:
        _assert_logged_equals_eval(run, caches[1], tmp_path)


@pytest.mark.parametrize("per_pass", [1, 3])
def test_compare_scores_runs_together_as_refseg_eval_scores_each(sweep, caches, monkeypatch, per_pass):
    monkeypatch.setattr(compare, "RUNS_PER_PASS", per_pass)  # passes of one run, and a pass of 3 then 1
    together = compare.score_runs(sweep, caches[1], device="cpu")
    assert together == [evaluate(run, caches[1], device="cpu") for run in sweep]
    assert len({s["oIoU"] for s in together}) > 1  # the runs are told apart, not one run's numbers repeated


def test_one_pass_over_several_heads_scores_each_as_alone(caches):
    _, val_cache = caches
    spec = open_cache(val_cache).spec
    models = []
    for seed, head in enumerate(("vpd", "film", "linear")):
        torch.manual_seed(seed)
        models.append(build_head(head, spec, **({} if head == "linear" else {"hidden": 8})))
    names = list(dict.fromkeys(n for m in models for n in m.tensor_names))
    together = score(models, FeatureDataset(val_cache, T, names=names, text=True), device=torch.device("cpu"))
    for model, metrics in zip(models, together):
        alone = score([model], FeatureDataset(val_cache, T, names=model.tensor_names, text=model.uses_text),
                      device=torch.device("cpu"), batch_size=5)[0]
        assert metrics.summary() == alone.summary() and metrics.intersections == alone.intersections
        assert metrics.summary()["n"] == 20 and model.training  # the models are given back in train mode
    assert len({m.summary()["oIoU"] for m in together}) == 3  # three heads, three different scores
