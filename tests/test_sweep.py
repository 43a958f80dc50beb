"""refseg-sweep (heads/sweep.py): a sweep head's weights are its solo run's bytes, an interrupted
sweep resumes to the same bytes, the summary's arithmetic, grid refusals; and the training options
it rests on: --data-seed, --text-blind, --tensorboard."""

import csv
import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch
from _cli_util import one_line_error
from _heads_util import train_val_caches
from click.testing import CliRunner

from refseg.core.errors import RefsegError, RunError
from refseg.heads import evaluate, run_dir, train
from refseg.heads.cli_sweep import main as sweep_main
from refseg.heads.cli_train import main as train_main
from refseg.heads.sweep import run_sweep, summarize

T = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two heads x two seeds, lr and width fixed: one pass feeds four heads.
GRID = {"head": ["vpd", "film"], "seed": [0, 1], "noise_t": T, "lr": "1e-3", "optimizer": "adam", "hidden": 8,
        "epochs": 2, "batch_size": 8, "preload": True}
SOLO = dict(lr=1e-3, optimizer="adam", hidden=8, epochs=2, batch_size=8, preload=True, progress=False)
NAMES = ["head=vpd,seed=0", "head=vpd,seed=1", "head=film,seed=0", "head=film,seed=1"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("sweep-caches"), 40, 16)


@pytest.fixture(scope="module")
def sweep(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    rows = run_sweep(GRID, *caches, out, progress=False)
    return out, rows


def _files(run):
    return {name: (run / name).read_bytes() for name in ("head.safetensors", "best.safetensors")}


def test_sweep_heads_are_the_bytes_of_solo_runs(sweep, caches, tmp_path):
    out, _ = sweep
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(NAMES)
    for name in NAMES:
        head, seed = name.split(",")[0][5:], int(name[-1])
        solo = tmp_path / name
        train(caches[0], T, head, solo, val_cache=caches[1], seed=seed, **SOLO)
        assert _files(out / "runs" / name) == _files(solo), name
        sweep_log, solo_log = run_dir.read_metrics(out / "runs" / name), run_dir.read_metrics(solo)
        assert [(r["loss"], r["val"]) for r in sweep_log] == [(r["loss"], r["val"]) for r in solo_log]
        config = json.loads((out / "runs" / name / "config.json").read_text())
        assert (config["seed"], config["data_seed"], config["text_blind"]) == (seed, 0, False)
    # film and vpd of one seed differ (the init seed reaches the weights; the data order is shared)
    assert _files(out / "runs" / NAMES[0]) != _files(out / "runs" / NAMES[1])
    # a sweep run is a run directory refseg-eval reads: its best checkpoint scores its best val epoch
    best = max(run_dir.read_metrics(out / "runs" / NAMES[2]), key=lambda r: r["val"]["oIoU"])
    assert evaluate(out / "runs" / NAMES[2], caches[1])["oIoU"] == pytest.approx(best["val"]["oIoU"])


def test_summary_rows_are_the_mean_and_std_over_seeds(sweep):
    out, rows = sweep
    assert rows == summarize(out)
    assert [(r["head"], r["n_seeds"]) for r in rows] == [("vpd", 2), ("film", 2)]
    for row in rows:
        best = []
        for seed in (0, 1):
            log = run_dir.read_metrics(out / "runs" / f"head={row['head']},seed={seed}")
            best.append(max(log, key=lambda r: r["val"]["oIoU"])["val"])  # the first of equal maxima
        for metric in ("P@0.5", "P@0.9", "oIoU", "mIoU"):
            values = [b[metric] for b in best]
            assert row[f"{metric}_mean"] == pytest.approx(statistics.fmean(values))
            assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["head", "n_seeds", "P@0.5_mean"]
    assert float(table[1]["oIoU_mean"]) == pytest.approx(rows[1]["oIoU_mean"])
    md = (out / "summary.md").read_text().splitlines()
    assert md[0] == "| head | n_seeds | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |"
    assert f"{rows[0]['oIoU_mean']:.2f} ± {rows[0]['oIoU_std']:.2f}" in md[2]


def test_an_interrupted_sweep_resumes_to_the_same_bytes(sweep, caches, tmp_path, monkeypatch):
    out, rows = sweep
    resumed = tmp_path / "resumed"
    real_save_state, saved = run_dir.save_state, []

    def save_then_kill(*args, **kwargs):  # killed in epoch 2's end, after 2 of its 4 heads saved
        real_save_state(*args, **kwargs)
        saved.append(args[0])
        if len(saved) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_dir, "save_state", save_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(GRID, *caches, resumed, progress=False)
    monkeypatch.setattr(run_dir, "save_state", real_save_state)
    epochs = [run_dir.completed_epoch(resumed / "runs" / name) for name in NAMES]
    assert epochs == [2, 2, 1, 1]
    assert run_sweep(GRID, *caches, resumed, progress=False) == rows
    for name in NAMES:
        assert _files(resumed / "runs" / name) == _files(out / "runs" / name), name
    # a finished sweep run again trains nothing: no run file changes
    before = {name: (resumed / "runs" / name / "state.safetensors").stat().st_mtime_ns for name in NAMES}
    run_sweep(GRID, *caches, resumed, progress=False)
    assert before == {name: (resumed / "runs" / name / "state.safetensors").stat().st_mtime_ns for name in NAMES}


def test_one_seed_cells_have_an_empty_std_and_the_cli_prints_the_table(caches, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("head: linear\nnoise_t: 5\nlr: [1e-3, 3e-4]\noptimizer: adam\nepochs: 1\ntensors: [s8, s16]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(sweep_main, ["--cache", str(caches[0]), "--val-cache", str(caches[1]), "--grid",
                                             str(grid), "--out", str(out), "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["lr=0.0003", "lr=0.001"]
    config = json.loads((out / "runs" / "lr=0.0003" / "config.json").read_text())
    assert config["lr"] == 3e-4 and config["head_args"]["tensors"] == ["s16", "s8"]  # YAML's "3e-4" read as a number
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["lr"], r["n_seeds"], r["oIoU_std"]) for r in rows] == [("0.001", "1", ""), ("0.0003", "1", "")]
    assert "| lr | n_seeds |" in result.output and "| 0.001 | 1 |" in result.output


@pytest.mark.parametrize("grid, fragment", [
    ("head: [vpd]\nnoise_t: 5\nlrr: 1e-3\n", "unknown grid key 'lrr' for head 'vpd'"),
    ("head: [vpd, film]\nnoise_t: 5\ntext_hidden: 8\n", "unknown grid key 'text_hidden' for head 'vpd'"),
    ("head: [vpd]\nnoise_t: 5\nepochs: [2, two]\n", "grid key 'epochs' must be a number (a whole number), got 'two'"),
    ("head: [vpd]\nnoise_t: 5\nepochs: 0\n", "--epochs must be at least 1, got 0"),
    ("head: [vpd]\nnoise_t: 5\nseed: []\n", "grid key 'seed' has an empty list"),
    ("head: [vpd]\nnoise_t: 5\nseed: [1, 1]\n", "gives run 'head=vpd,seed=1' twice"),
    ("head: [vpd, nope]\nnoise_t: 5\n", "unknown head 'nope'"),
    ("head: vpd\n", "the grid must give noise_t"),
    ("head: vpd\nnoise_t: 9\n", "noise level T=9 is not in cache"),
    ("head: vpd\nnoise_t: 5\nout: x\n", "out is not a grid key"),
    ("head: vpd\nnoise_t: 5\ntensors: [s99]\n", "cannot build head 'vpd'"),
    ("- head\n", "must be a mapping"),
    ("head: [vpd\n", "is not valid YAML"),
])
def test_bad_grids_are_refused_in_one_line_before_anything_is_written(caches, tmp_path, grid, fragment):
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    out = tmp_path / "out"
    result = CliRunner().invoke(sweep_main, ["--cache", str(caches[0]), "--val-cache", str(caches[1]), "--grid",
                                             str(path), "--out", str(out)])
    one_line_error(result, fragment)
    assert not out.exists()


# ---- the options a sweep rests on ---------------------------------------------------------------
def test_data_seed_orders_the_data_apart_from_the_init_seed(caches, tmp_path):
    kw = dict(SOLO, epochs=1)
    train(caches[0], T, "vpd", tmp_path / "a", seed=0, data_seed=0, **kw)
    train(caches[0], T, "vpd", tmp_path / "b", seed=0, data_seed=1, **kw)
    train(caches[0], T, "vpd", tmp_path / "c", seed=0, data_seed=1, **kw)
    assert (tmp_path / "b/head.safetensors").read_bytes() == (tmp_path / "c/head.safetensors").read_bytes()
    assert (tmp_path / "a/head.safetensors").read_bytes() != (tmp_path / "b/head.safetensors").read_bytes()
    # a run recorded before --data-seed existed had its data ordered by its seed: it resumes as data_seed=seed
    cfg_path = tmp_path / "c/config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("data_seed", "text_blind"):
        del cfg[key]
    cfg["seed"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="trained with seed=1, not 0"):
        train(caches[0], T, "vpd", tmp_path / "c", seed=0, data_seed=1, resume=True, **kw)
    with pytest.raises(RunError, match="trained with data_seed=1, not 0"):
        train(caches[0], T, "vpd", tmp_path / "c", seed=1, data_seed=0, resume=True, **kw)


def test_text_blind_head_gets_no_sentence_and_no_attention_maps(caches, tmp_path):
    run = tmp_path / "blind"
    train(caches[0], T, "film", run, val_cache=caches[1], text_blind=True, **dict(SOLO, epochs=1))
    config = json.loads((run / "config.json").read_text())
    assert config["text_blind"] is True and config["head_args"]["tensors"] == ["s32", "s16", "s8"]
    assert [t["name"] for t in config["spec"]["tensors"]] == ["s8", "s16", "s32"]  # no attn_s16, attn_s32

    from refseg.cache import open_cache
    from refseg.core.feature_spec import FeatureSpec
    from refseg.heads.evaluate import load_head
    from refseg.heads.registry import build_head

    spec = open_cache(caches[1]).spec
    model, _, _ = load_head(run, "last")  # what refseg-eval and predict score: config.json's text_blind applied
    seeing = build_head("film", FeatureSpec.from_dict(config["spec"]), **config["head_args"]).eval()
    seeing.load_state_dict(model.state_dict())
    features = {n: torch.randn(2, *spec[n].shape) for n in model.tensor_names}
    text, mask = torch.randn(2, spec.token_length, spec.text_dim), torch.tensor([[1, 1, 0, 0, 0, 0]] * 2).bool()
    blind = model(features, text, mask)
    assert not torch.equal(seeing(features, text, mask), blind)  # the sentence reaches an ordinary film head
    assert torch.equal(blind, model(features, -text, ~mask))  # and no longer reaches a blind one
    assert torch.equal(blind, model(features, torch.zeros_like(text), torch.ones_like(mask)))
    with pytest.raises(RefsegError, match="--text-blind reads no cross-attention maps.*attn_s16"):
        train(caches[0], T, "vpd", tmp_path / "maps", text_blind=True, tensors=["s8", "attn_s16"],
              **dict(SOLO, epochs=1))
    assert not (tmp_path / "maps").exists()


def test_tensorboard_logs_each_epoch_or_says_how_to_install_it(caches, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(caches[0], T, "vpd", run, val_cache=caches[1], tensorboard=True, **SOLO)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/oIoU", "val/mIoU", "val/P@0.5"} <= set(events.Tags()["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["epoch"], pytest.approx(r["loss"])) for r in run_dir.read_metrics(run)]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "none"
    result = CliRunner().invoke(train_main, ["--cache", str(caches[0]), "--noise-t", "5", "--head", "vpd", "--out",
                                             str(out), "--epochs", "1", "--tensorboard"])
    one_line_error(result, "--tensorboard needs TensorBoard", "pip install refseg[tensorboard]")
    assert not out.exists()


# ---- torchrun: the heads split across ranks -----------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from refseg.heads.sweep import run_sweep
    run_sweep(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], progress=False, threads=1)
""")


def test_two_ranks_split_the_heads_and_each_is_its_solo_run(sweep, caches, tmp_path):
    out, rows = sweep
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), json.dumps(GRID), str(caches[0]), str(caches[1]), str(two)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in NAMES:
        assert _files(two / "runs" / name) == _files(out / "runs" / name), name
        assert json.loads((two / "runs" / name / "config.json").read_text())["world_size"] == 1
    assert summarize(two) == rows
    assert (two / "summary.csv").read_text() == (out / "summary.csv").read_text()


# ---- local processes: the heads split across CPU processes --------------------------------------
def test_two_local_processes_split_the_heads_and_each_is_its_one_thread_solo_run(sweep, caches, tmp_path):
    out, rows = sweep  # the module's sweep ran on one thread (conftest)
    two = tmp_path / "two"
    before = torch.get_num_threads()
    assert run_sweep(GRID, *caches, two, progress=False, threads=2, processes=2) == rows
    assert torch.get_num_threads() == before
    for name in NAMES:
        assert _files(two / "runs" / name) == _files(out / "runs" / name), name
    assert (two / "summary.csv").read_text() == (out / "summary.csv").read_text()


@pytest.mark.parametrize("processes, env, fragment", [
    (0, {}, "--processes must be at least 1 (got 0)"),
    (2, {"WORLD_SIZE": "2", "RANK": "0"}, "under torchrun the ranks split them already"),
])
def test_bad_process_counts_are_refused_before_anything_is_written(caches, tmp_path, monkeypatch, processes, env,
                                                                   fragment):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RefsegError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        run_sweep(GRID, *caches, tmp_path / "s", progress=False, processes=processes)
    assert not (tmp_path / "s").exists()
