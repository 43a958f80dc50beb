"""The demo pipeline at a small size: every table row and every file it promises, and the rule that
turns the table into conclusions."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.core.errors import CacheMismatchError
from refseg.study.demo import run_demo
from refseg.study.demo_config import DemoConfig
from refseg.study.stats import bootstrap_std, interval, paired_bootstrap_std, verdict


def _every_object(out):
    from refseg.cache import open_cache

    cache = open_cache(out / "cache" / "val.zarr")
    inter = union = 0
    ious = []
    for row, every in _every_object_masks(out, cache).items():
        gt = cache.gt([row])[0] != 0
        assert gt.shape == every.shape  # the demo's images are drawn at the cache's size
        i, u = int((every & gt).sum()), int((every | gt).sum())
        inter, union = inter + i, union + u
        ious.append(i / u)
    return {"oIoU": 100 * inter / union, "mIoU": 100 * float(np.mean(ious)), "n": len(ious)}


def _cell(mean, std, n=3):
    return {"oIoU_mean": mean, "oIoU_std": std, "n_seeds": n}


def test_a_difference_is_called_only_where_the_intervals_separate():
    # mean ± 2·std/√n: 30 ± 1.15 against 20 ± 1.15 separate; 30 ± 11.5 against 20 ± 1.15 do not
    assert verdict(_cell(30.0, 1.0), _cell(20.0, 1.0), "film", "vpd") == "film beats vpd (30.0 vs 20.0)"
    assert verdict(_cell(20.0, 1.0), _cell(30.0, 1.0), "film", "vpd") == "vpd beats film (30.0 vs 20.0)"
    assert verdict(_cell(30.0, 10.0), _cell(20.0, 1.0), "a", "b") == "a vs b: no clear difference (30.0 vs 20.0)"
    lo, hi = interval(_cell(30.0, 3.0, n=4))
    assert (lo, hi) == pytest.approx((27.0, 33.0))
    assert "no clear difference" in verdict(_cell(30.0, float("nan"), n=1), _cell(1.0, float("nan"), n=1), "a", "b")
    # the val sampling of the difference joins the seeds' spread: 2 points beat 2·0.82 but not 2·1.29
    assert verdict(_cell(30.0, 1.0), _cell(28.0, 1.0), "a", "b") == "a beats b (30.0 vs 28.0)"
    assert "no clear difference" in verdict(_cell(30.0, 1.0), _cell(28.0, 1.0), "a", "b", sampling=1.0)


def test_bootstrap_std_of_oiou_matches_the_binomial_std():
    # 400 sentences with u = 1 and i in {0, 1} at p = 0.5: oIoU is a mean, its std 100·√(p(1-p)/n) = 2.5
    i = np.array([0, 1] * 200)
    assert bootstrap_std(i, np.ones(400), draws=2000) == pytest.approx(2.5, rel=0.1)
    assert bootstrap_std(np.full(50, 3), np.full(50, 6)) == 0.0  # every sample alike: no sampling spread
    # two runs on the same sentences: what they share cancels in the paired difference
    rng = np.random.default_rng(1)
    hard = rng.integers(0, 2, 400)  # sentences both runs get right or wrong alike
    a = {k: (int(hard[k]), 1) for k in range(400)}
    b = {k: (int(hard[k]) if k % 10 else 1 - int(hard[k]), 1) for k in range(400)}  # differs on 10%
    assert paired_bootstrap_std(a, a) == 0.0
    assert paired_bootstrap_std(a, b) == pytest.approx(100 * math.sqrt(0.1 * 0.9 / 400), rel=0.2)  # ~1.5
    assert paired_bootstrap_std(a, b) < 0.75 * bootstrap_std(*zip(*a.values()))  # ~2.5 unpaired


def test_extraction_leaves_a_core_to_the_cache_writer(monkeypatch):
    from refseg.study.demo_processes import extraction_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what default_threads() reads first: 1 usable core for torch
    before = torch.get_num_threads()
    with extraction_threads(2):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _small_demo(out, threads):
    cfg = DemoConfig(out=str(out), model="tiny", images=24, train_samples=40, image_size=64,
                     epochs=1, hidden=8, seeds=2, batch_size=8, device="cpu", threads=threads, progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = run_demo(cfg)
        assert torch.get_num_threads() == 3  # the demo's own thread count is undone afterwards
    finally:
        torch.set_num_threads(before)
    return result


@pytest.fixture(scope="module")
def demo_on_one_thread(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-1") / "demo"
    return out, _small_demo(out, threads=1)


def test_demo_on_two_threads_gives_the_one_thread_caches_and_table(demo_on_one_thread, tmp_path):
    one, _ = demo_on_one_thread
    two = tmp_path / "demo"
    _small_demo(two, threads=2)  # two one-thread processes extract and train (study/demo_processes.py cpu_processes)
    assert (two / "ablation.csv").read_text() == (one / "ablation.csv").read_text()
    for split in ("train", "val"):
        shards = [p for p in (one / "cache" / f"{split}.zarr").glob("t*/*/c/**/*") if p.is_file()]
        assert len(shards) >= 3 * 6  # each of the 4 features and 2 attention maps at each T
        for shard in shards:
            assert shard.read_bytes() == (two / shard.relative_to(one)).read_bytes(), shard
    for run in (one / "sweep" / "runs").iterdir():
        assert (run / "head.safetensors").read_bytes() == (two / "sweep" / "runs" / run.name /
                                                           "head.safetensors").read_bytes(), run.name


def test_a_study_folder_of_other_settings_is_refused_whole_with_this_command_s_advice(demo_on_one_thread, tmp_path):
    """Rerunning the demo on a folder made with another backbone (tiny-synth's weights change between
    versions) or other settings: one line that says what to do here (the demo has no --overwrite), and
    nothing in the folder changes."""
    one, _ = demo_on_one_thread
    old = tmp_path / "old"
    shutil.copytree(one, old)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    cfg = DemoConfig(out=str(old), model="tiny", images=24, train_samples=40, image_size=64, epochs=1, hidden=8,
                     seeds=2, batch_size=8, device="cpu", threads=1, progress=False, cache_dtype="fp32")
    with pytest.raises(CacheMismatchError) as err:
        run_demo(cfg)
    message = str(err.value)
    assert "extraction.cache_dtype is (absent) in the store but 'float32' now" in message and "\n" not in message
    assert message.endswith(f"{old} holds a study of another backbone or other settings (tiny-synth's weights "
                            "change with refseg); remove that folder or choose another --out")
    assert "--overwrite" not in message
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_demo_writes_the_ablation_table_and_figures(demo_on_one_thread):
    out, result = demo_on_one_thread

    # one row per (head, T), then the best head's no-sentence baseline at each T: mean and std over 2 seeds
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    best = result["study"]["best"]["head"]
    assert [(r["head"], r["text_blind"], int(r["noise_t"])) for r in rows] == [
        ("vpd", "0", 0), ("vpd", "0", 5), ("vpd", "0", 500), ("film", "0", 0), ("film", "0", 5), ("film", "0", 500),
        (best, "1", 0), (best, "1", 5), (best, "1", 500)]
    for r in rows:
        assert r["n_seeds"] == "2"
        means = [float(r[f"{k}_mean"]) for k in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")]
        assert all(0.0 <= v <= 100.0 for v in means)
        assert means[:5] == sorted(means[:5], reverse=True)  # P@X cannot grow with X
        assert float(r["oIoU_std"]) >= 0.0
    table = (out / "ablation.md").read_text()
    assert "| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU | seeds |" in table
    assert f"### head `{best} (no sentence)`" in table and " ± " in table
    assert table.split("## Conclusions")[0].count("\n| 500 |") == 3

    # the conclusions: every pair of noise levels and of heads is given a verdict by the rule
    text = table.split("## Conclusions")[1]
    called = ("- Noise", "- Heads", "- What the sentence adds")
    verdicts = [line for line in text.splitlines() if line.startswith(called)]
    assert len(verdicts) == 2 * 3 + 3 + 3  # 3 pairs of T per head, 3 head pairs (one per T), 3 baselines
    assert all(("beats" in v) != ("no clear difference" in v) for v in verdicts)
    assert "Spread: std of val oIoU over seeds" in text and "bootstrap" in text

    # the probe's table: pointing accuracy and its chance per noise level and attention tensor
    probe = table.split("## Zero-shot attention probe")[1]
    assert "| T | tensor | pointing % | chance % |" in probe
    assert sum(line.startswith("| 500 |") for line in probe.splitlines()) >= 1

    # results.json holds the same numbers as the CSV, the chance level and the spreads
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "tiny" and saved["torch_threads"] == 1
    assert f"{saved['cells'][4]['oIoU_mean']:.2f}" == rows[4]["oIoU_mean"]
    study = saved["study"]
    assert 0 < study["chance"]["oIoU"] < 100 and study["sampling_std"] >= 0 and math.isfinite(study["seed_std"])
    # the every-object reference: the union of every annotation of each val sentence's image against its
    # GT, recomputed here from instances.json with pycocotools (the vpd rule: a pixel of exactly one polygon)
    assert study["every_object"] == pytest.approx(_every_object(out), abs=1e-9)
    assert study["chance"]["oIoU"] < study["every_object"]["oIoU"] < 100
    every = f"{study['every_object']['oIoU']:.1f}"
    assert f"predicting every object of the image, the sentence unread, gives {every}" in text
    # by kind of sentence: the best cell, its no-sentence baseline and every object; the kinds add up to all
    kinds = table.split("### Val oIoU by kind of sentence (first seeds)")[1].split("##")[0].strip().splitlines()
    best_t = result["study"]["best"]["noise_t"]
    assert kinds[0] == f"| sentence kind | n | {best} T={best_t} | no sentence | every object |"
    rows_by_kind = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in kinds[2:]}
    assert set(rows_by_kind) <= {"attribute", "position", "relation", "all"} and "all" in rows_by_kind
    n_by_kind = [int(r[1]) for k, r in rows_by_kind.items() if k != "all"]
    assert sum(n_by_kind) == int(rows_by_kind["all"][1]) == study["chance"]["n"]
    assert rows_by_kind["all"][4] == every

    # every figure is a real, non-blank image
    for name in ("ablation.png", "curves.png", "noise_strip.png", "overlays.png", "features.png"):
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.shape[0] > 100 and img.shape[1] > 200, name
        assert img.std() > 5, f"{name} looks blank"

    # the caches hold the three noise levels; each run is a complete run directory of one epoch
    for split in ("train", "val", "train-no-sentence", "val-no-sentence"):
        levels = sorted(p.name for p in (out / "cache" / f"{split}.zarr").glob("t[0-9][0-9][0-9][0-9]"))
        assert levels == ["t0000", "t0005", "t0500"], split
    # the baseline trained and was scored on the empty prompt's features: the sentence is gone from the backbone too
    from refseg.cache import open_cache

    assert open_cache(out / "cache" / "val-no-sentence.zarr").extraction_record["extraction"]["prompt"] == "empty"
    for run in (out / "sweep-no-sentence" / "runs").iterdir():
        config = json.loads((run / "config.json").read_text())
        trained_on = config["cache"]
        assert trained_on["path"].endswith("train-no-sentence.zarr") and config["text_blind"] is True
        assert trained_on["settings"]["extraction"]["prompt"] == "empty"
    runs = sorted((out / "sweep" / "runs").iterdir()) + sorted((out / "sweep-no-sentence" / "runs").iterdir())
    assert len(runs) == 2 * 3 * 2 + 3 * 2
    for run in runs:
        assert {"best.safetensors", "config.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_demo_splits_each_cell_s_errors_and_calls_every_object_on_both_metrics(demo_on_one_thread):
    from refseg.cache import open_cache
    from refseg.heads.evaluate import predict
    from refseg.study.errors import KINDS

    out, result = demo_on_one_thread
    saved = json.loads((out / "results.json").read_text())
    study, cells = saved["study"], saved["cells"]
    # one row per cell of the table, in its order; the kinds share every prediction of each seed
    assert [(r["head"], r["noise_t"], r["text_blind"]) for r in study["errors"]] == [
        (c["head"], c["noise_t"], c["text_blind"]) for c in cells]
    for row, cell in zip(study["errors"], cells):
        assert sum(row[k] for k in KINDS) == pytest.approx(100.0)
        assert row["n"] == study["chance"]["n"] and row["n_seeds"] == 2
        assert row["right"] == pytest.approx(cell["P@0.5_mean"])  # "right" is P@0.5's hit, seed by seed
    # "no object": predictions with no pixel on any object, recounted from instances.json (pycocotools)
    cache = open_cache(out / "cache" / "val.zarr")
    every = _every_object_masks(out, cache)
    best = next(c for c in cells if not c["text_blind"])
    first = [r for r in predict(best["runs"][0], cache, device="cpu")]
    second = [r for r in predict(best["runs"][1], cache, device="cpu")]
    touching_none = [100 * np.mean([not (r["pred"] & every[r["row"]]).any() for r in run]) for run in (first, second)]
    assert study["errors"][0]["no object"] == pytest.approx(np.mean(touching_none))

    table = (out / "ablation.md").read_text()
    section = table.split("### Where the errors are (val, mean over seeds)")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # below the header
    blind = result["study"]["best"]["head"] + " (no sentence)"
    assert [line.split(" | ")[0][2:] for line in rows] == ["vpd"] * 3 + ["film"] * 3 + [blind] * 3
    # the best cell and its no-sentence baseline against every object, on oIoU and on mIoU
    against = study["against_every_object"]
    best_cell = max((c for c in cells if not c["text_blind"]), key=lambda c: c["oIoU_mean"])
    for metric in ("oIoU", "mIoU"):
        assert against["best"][metric]["reference"] == study["every_object"][metric]
        assert against["best"][metric]["cell"] == best_cell[f"{metric}_mean"]
        assert against["best"][metric]["call"] in ("above", "below", "not clearly different")
    b = against["best"]
    line = (f"against every object (the sentence unread): oIoU {b['oIoU']['cell']:.1f} vs "
            f"{b['oIoU']['reference']:.1f} ({b['oIoU']['difference']:+.1f}, {b['oIoU']['call']}), mIoU "
            f"{b['mIoU']['cell']:.1f} vs {b['mIoU']['reference']:.1f}")
    assert line in table and "no sentence against every object" in table


def _every_object_masks(out, cache):
    """row -> the union of every object of its image at the cache's size, from instances.json (pycocotools)."""
    from pycocotools import mask as mask_utils

    data = json.loads((out / "data" / "refcoco-synth" / "instances.json").read_text())
    images = {img["id"]: img for img in data["images"]}
    masks = {}
    for row, image_id in enumerate(cache.index["image_id"]):
        img = images[int(image_id)]
        every = np.zeros((img["height"], img["width"]), bool)
        for ann in (a for a in data["annotations"] if a["image_id"] == int(image_id)):
            parts = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
            every |= parts.sum(axis=2) == 1
        masks[row] = every
    return masks
