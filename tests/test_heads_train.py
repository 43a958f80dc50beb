"""Training and evaluation on a small learnable cache: learning, film vs vpd, metrics recomputed
independently, determinism, resume, run-directory contents and refusals."""

import csv
import json

import numpy as np
import pytest
import torch
from _heads_util import make_cache, train_val_caches
from safetensors.torch import load_file

from refseg.cache import open_cache
from refseg.heads import build_head, evaluate, predict, train
from refseg.heads import run_dir
from refseg.heads.evaluate import evaluate_model
from refseg.cache import FeatureDataset
from refseg.core.errors import CacheError, CacheMismatchError, RefsegError, RunError
from refseg.core.metrics import RefSegMetrics

T = 5
FAST = dict(batch_size=8, lr=1e-3, optimizer="adam", hidden=16, progress=False, preload=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return train_val_caches(tmp_path_factory.mktemp("heads-caches"), 128, 32)


@pytest.fixture(scope="module")
def runs(caches, tmp_path_factory):
    """vpd and film trained once (10 epochs) and shared by the tests that read them."""
    train_cache, val_cache = caches
    root = tmp_path_factory.mktemp("heads-runs")
    out = {}
    for head in ("vpd", "film"):
        out[head] = root / head
        train(train_cache, T, head, out[head], val_cache=val_cache, epochs=10, seed=0, **FAST)
    return out


def _untrained_oiou(head, val_cache):
    cache = open_cache(val_cache)
    torch.manual_seed(0)
    model = build_head(head, cache.spec, hidden=16)
    ds = FeatureDataset(val_cache, T, names=model.tensor_names, text=model.uses_text)
    summary, _ = evaluate_model(model, ds, device=torch.device("cpu"))
    return summary["oIoU"]


def test_training_learns_and_film_uses_the_text(runs, caches):
    _, val_cache = caches
    results = {head: evaluate(run, val_cache, checkpoint="best") for head, run in runs.items()}
    untrained = {head: _untrained_oiou(head, val_cache) for head in runs}
    print("\nval oIoU (synthetic two-rectangle cache): "
          + ", ".join(f"{h}: untrained {untrained[h]:.1f} -> trained {r['oIoU']:.1f}" for h, r in results.items()))
    for head, summary in results.items():
        assert summary["n"] == 32
        assert summary["oIoU"] > untrained[head] + 5  # learned something
        assert summary["oIoU"] > 0.0  # an all-background prediction scores 0
    # Without the sentence the best is P, Q or their union (oIoU ~ 50); film can pick the target.
    assert results["vpd"]["oIoU"] < 55
    assert results["film"]["oIoU"] > results["vpd"]["oIoU"] + 20
    assert results["film"]["P@0.5"] > 70


def test_run_directory_contents(runs, caches):
    train_cache, val_cache = caches
    run = runs["film"]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "head.safetensors", "best.safetensors", "metrics.jsonl", "state.safetensors"])
    cfg = json.loads((run / "config.json").read_text())
    cache = open_cache(train_cache)
    assert cfg["head"] == "film" and cfg["head_args"]["hidden"] == 16
    assert cfg["cache"]["fingerprint"] == cache.fingerprint and cfg["cache"]["settings"] == cache.extraction_record
    assert cfg["noise_t"] == T and cfg["timestep"] == T and cfg["seed"] == 0
    assert (cfg["optimizer"], cfg["lr"], cfg["epochs"], cfg["batch_size"]) == ("adam", 1e-3, 10, 8)
    assert cfg["versions"]["torch"] == torch.__version__ and "refseg" in cfg["versions"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 11))
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and "oIoU" in r["val"] for r in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    # best.safetensors is the epoch with the best val oIoU, and evaluating it reproduces that number
    best_epoch = max(lines, key=lambda r: r["val"]["oIoU"])
    assert evaluate(run, val_cache, checkpoint="best")["oIoU"] == pytest.approx(best_epoch["val"]["oIoU"])
    assert evaluate(run, val_cache, checkpoint="last")["oIoU"] == pytest.approx(lines[-1]["val"]["oIoU"])


def test_evaluate_equals_metrics_recomputed_from_predictions(runs, caches, tmp_path):
    _, val_cache = caches
    run = runs["film"]
    summary = evaluate(run, val_cache, per_sample=tmp_path / "per.csv", json_out=tmp_path / "eval.json")

    cache = open_cache(val_cache)
    independent = RefSegMetrics()
    preds = list(predict(run, val_cache))
    assert len(preds) == 32 and preds[0]["pred"].shape == (64, 64) and preds[0]["pred"].dtype == bool
    for p in preds:
        independent.update(p["pred"], cache.gt(p["row"]) != 0)
    assert independent.summary() == summary

    rows = list(csv.DictReader(open(tmp_path / "per.csv")))
    assert list(rows[0])[:5] == ["sent_id", "ref_id", "iou", "i", "u"]  # the metric columns first
    assert [int(r["sent_id"]) for r in rows] == [p["sent_id"] for p in preds]
    from_csv = RefSegMetrics()
    for r, p in zip(rows, preds):
        gt = cache.gt(p["row"]) != 0
        assert int(r["i"]) == np.count_nonzero(p["pred"] & gt) and int(r["u"]) == np.count_nonzero(p["pred"] | gt)
        from_csv.add(int(r["i"]), int(r["u"]))
    assert from_csv.summary() == summary

    info = json.loads((tmp_path / "eval.json").read_text())
    assert info["summary"] == summary and info["head"] == "film" and info["checkpoint"] == "best"
    assert info["cache_fingerprint"] == cache.fingerprint and info["noise_t"] == T and info["protocol"] == "vpd"


def _tensors(path):
    return load_file(str(path))


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_same_seed_same_weights_other_seed_differs(caches, tmp_path):
    train_cache, _ = caches
    kw = dict(FAST, epochs=1, max_samples=32)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(train_cache, T, "vpd", tmp_path / name, seed=seed, **kw)
    assert (tmp_path / "a/head.safetensors").read_bytes() == (tmp_path / "b/head.safetensors").read_bytes()
    assert not _same(tmp_path / "a/head.safetensors", tmp_path / "c/head.safetensors")


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(caches, tmp_path, monkeypatch, optimizer):
    train_cache, val_cache = caches
    kw = dict(FAST, optimizer=optimizer, max_samples=48, seed=3)
    kw["lr"] = 1e-3
    train(train_cache, T, "film", tmp_path / "straight", val_cache=val_cache, epochs=3, **kw)

    # Interrupted after epoch 1 (Ctrl-C right after its state was saved), then resumed to the end.
    real_save_state = run_dir.save_state

    def save_then_interrupt(*args, **kwargs):
        real_save_state(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir, "save_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(train_cache, T, "film", tmp_path / "resumed", val_cache=val_cache, epochs=3, **kw)
    monkeypatch.setattr(run_dir, "save_state", real_save_state)
    assert len(run_dir.read_metrics(tmp_path / "resumed")) == 1
    train(train_cache, T, "film", tmp_path / "resumed", val_cache=val_cache, epochs=3, resume=True, **kw)

    for name in ("head.safetensors", "best.safetensors"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    a = run_dir.read_metrics(tmp_path / "straight")
    b = run_dir.read_metrics(tmp_path / "resumed")
    assert [(r["epoch"], r["loss"], r["val"]) for r in a] == [(r["epoch"], r["loss"], r["val"]) for r in b]


def test_resume_extends_a_finished_run_with_constant_lr(caches, tmp_path):
    train_cache, _ = caches
    kw = dict(FAST, max_samples=32, seed=1)
    train(train_cache, T, "vpd", tmp_path / "two", epochs=2, **kw)
    train(train_cache, T, "vpd", tmp_path / "one", epochs=1, **kw)
    summary = train(train_cache, T, "vpd", tmp_path / "one", epochs=2, resume=True, **kw)
    assert summary["epochs"] == 2
    assert _same(tmp_path / "two/head.safetensors", tmp_path / "one/head.safetensors")
    assert not (tmp_path / "one/best.safetensors").exists()  # no val cache: no best epoch
    # evaluate(checkpoint="best") then uses the last weights, and says so
    evaluate(tmp_path / "one", train_cache, json_out=tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == "last"


def test_run_directory_refusals(caches, tmp_path):
    train_cache, _ = caches
    kw = dict(FAST, epochs=1, max_samples=16)
    run = tmp_path / "run"
    train(train_cache, T, "vpd", run, **kw)
    with pytest.raises(RunError, match="already exists and is not empty.*--resume"):
        train(train_cache, T, "vpd", run, **kw)
    with pytest.raises(RunError, match="trains head 'vpd', not 'film'"):
        train(train_cache, T, "film", run, resume=True, **kw)
    with pytest.raises(RunError, match="seed=0, not 7"):
        train(train_cache, T, "vpd", run, resume=True, **dict(kw, seed=7))
    empty = tmp_path / "empty"
    empty.mkdir()
    train(train_cache, T, "linear", empty, **kw)  # an existing empty directory is fine

    # a checkpoint that is not safetensors (e.g. a pickle) is refused, never unpickled
    (run / "head.safetensors").write_bytes(b"\x80\x04\x95not a safetensors file")
    with pytest.raises(RunError, match="not a valid safetensors file"):
        evaluate(run, train_cache, checkpoint="last")
    (run / "head.safetensors").unlink()
    (run / "head.pt").write_bytes(b"\x80\x04")
    with pytest.raises(RunError, match="no head.safetensors.*head.pt"):
        evaluate(run, train_cache, checkpoint="last")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(RunError, match="not a head run directory"):
        evaluate(tmp_path / "not-a-run", train_cache)
    with pytest.raises(RunError, match="does not exist"):
        evaluate(tmp_path / "missing", train_cache)


def test_incompatible_caches_and_noise_levels(runs, caches, tmp_path):
    _, val_cache = caches
    other = tmp_path / "other.zarr"
    from _heads_util import settings

    make_cache(other, 8, split="val", seed=2, settings_override=settings("val", model="another-backbone"))
    with pytest.raises(CacheMismatchError, match="backbone.model is 'another-backbone' in the cache but "
                                                 "'synthetic-test' in the run"):
        evaluate(runs["vpd"], other)
    with pytest.raises(CacheMismatchError, match="backbone.model"):
        train(caches[0], T, "vpd", tmp_path / "r", val_cache=other, **dict(FAST, epochs=1))
    with pytest.raises(RefsegError, match="trained at noise T=5 but T=0.*--allow-noise-mismatch"):
        evaluate(runs["vpd"], val_cache, 0)
    with pytest.raises(CacheError, match="noise level T=0 is not in cache"):
        evaluate(runs["vpd"], val_cache, 0, allow_noise_mismatch=True)
    with pytest.raises(CacheError, match="noise level T=9 is not in cache"):
        train(caches[0], 9, "vpd", tmp_path / "r9", **dict(FAST, epochs=1))
    assert not (tmp_path / "r9").exists()  # nothing written before the error


def test_noise_transfer_with_allow_noise_mismatch(runs, tmp_path):
    cache = tmp_path / "two-levels.zarr"
    make_cache(cache, 16, split="val", seed=1, noise_levels=(5, 50))
    same = evaluate(runs["film"], cache)
    moved = evaluate(runs["film"], cache, 50, allow_noise_mismatch=True)
    assert same["n"] == moved["n"] == 16


def test_dataloader_workers_change_nothing(caches, tmp_path):
    train_cache, val_cache = caches
    kw = dict(FAST, epochs=1, max_samples=24, preload=False)
    train(train_cache, T, "film", tmp_path / "w0", **kw)
    train(train_cache, T, "film", tmp_path / "w2", workers=2, **kw)
    assert _same(tmp_path / "w0/head.safetensors", tmp_path / "w2/head.safetensors")


def test_heads_never_import_the_backbone_libraries():
    import subprocess
    import sys

    code = ("import sys, refseg.heads, refseg.heads.cli_train, refseg.heads.cli_eval; "
            "bad = [m for m in ('diffusers', 'transformers', 'refseg.extract', 'refseg.backbones') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_preload_that_does_not_fit_is_refused(caches, tmp_path, monkeypatch, capsys):
    import refseg.cache.dataset

    train_cache, _ = caches
    monkeypatch.setattr(refseg.cache.dataset, "available_memory", lambda: 1000)
    with pytest.raises(CacheError, match="needs .* of RAM"):
        train(train_cache, T, "vpd", tmp_path / "r", **dict(FAST, epochs=1, progress=True))
    assert "preload: 0.00 GB for 128 samples" in capsys.readouterr().out  # said before trying


def test_auto_preload_gives_the_same_weights_and_falls_back_when_ram_is_short(caches, tmp_path, monkeypatch):
    import sys

    train_setup = sys.modules["refseg.heads.train_setup"]
    train_cache, _ = caches
    args = {k: v for k, v in dict(FAST, epochs=1).items() if k != "preload"}
    train(train_cache, T, "vpd", tmp_path / "off", preload=False, **args)
    train(train_cache, T, "vpd", tmp_path / "auto", **args)  # default "auto": this small cache is preloaded
    monkeypatch.setattr(train_setup, "available_memory", lambda: 1000)
    train(train_cache, T, "vpd", tmp_path / "short", **args)  # auto with too little RAM: reads from disk, no error
    weights = {name: (tmp_path / name / "head.safetensors").read_bytes() for name in ("off", "auto", "short")}
    assert weights["off"] == weights["auto"] == weights["short"]
