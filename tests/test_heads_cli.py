"""`refseg-train-head` and `refseg-eval` through click: the table, one-line errors with exit 2,
the original-resolution protocol and overlays on a RefCOCO-format dataset."""

import csv
import json

import numpy as np
import pytest
import torch
from _cli_util import one_line_error as _one_line_error
from _heads_util import make_cache, settings, train_val_caches
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from refseg.cache import open_cache

from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main


@pytest.fixture(scope="module")
def cli_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads-cli")
    train_val_caches(root, 32, 16)
    make_cache(root / "other.zarr", 8, split="val", seed=2,
               settings_override=settings("val", image_size=64, latent_scaling="none"))
    return root


def _train(root, out, *extra):
    return CliRunner().invoke(train_main, [
        "--cache", str(root / "train.zarr"), "--noise-t", "5", "--head", "vpd", "--out", str(out),
        "--val-cache", str(root / "val.zarr"), "--epochs", "2", "--hidden", "8", "--optimizer", "adam",
        "--lr", "1e-3", *extra])



def test_cli_train_then_eval_prints_the_table(cli_caches, tmp_path):
    run = tmp_path / "run"
    result = _train(cli_caches, run)
    assert result.exit_code == 0, result.output
    assert (run / "best.safetensors").is_file() and (run / "config.json").is_file()
    assert "| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |" in result.output

    result = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(cli_caches / "val.zarr"),
                                            "--json", str(tmp_path / "e.json"), "--per-sample", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines.index("| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |")
    row = lines[header + 2]
    assert row.startswith("| T=5 | ")
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert row == "| T=5 | " + " | ".join(f"{summary[k]:.2f}" for k in
                                          ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")) + " |"
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 16

    # an existing run without --resume is refused in one line; --resume of a finished run is a no-op
    _one_line_error(_train(cli_caches, run), "already exists and is not empty", "--resume")
    assert _train(cli_caches, run, "--resume").exit_code == 0


def test_cli_errors_are_one_line_exit_2(cli_caches, tmp_path):
    run = tmp_path / "run"
    assert _train(cli_caches, run).exit_code == 0

    def evaluate(*args):
        return CliRunner().invoke(eval_main, ["--run", str(run), *args])

    # different extraction settings: refused, naming the setting
    _one_line_error(evaluate("--cache", str(cli_caches / "other.zarr")),
                    "extraction.latent_scaling is 'none' in the cache but 'sd' in the run")
    # a noise level the cache does not have
    _one_line_error(evaluate("--cache", str(cli_caches / "val.zarr"), "--noise-t", "500"),
                    "--allow-noise-mismatch")
    _one_line_error(evaluate("--cache", str(cli_caches / "val.zarr"), "--noise-t", "500", "--allow-noise-mismatch"),
                    "noise level T=500 is not in cache")
    _one_line_error(CliRunner().invoke(train_main, [
        "--cache", str(cli_caches / "train.zarr"), "--noise-t", "7", "--head", "vpd", "--out", str(tmp_path / "r7")]),
        "noise level T=7 is not in cache")
    # a head that refuses its arguments or the cache's tensors, and leaves no run folder behind
    for head, hidden, message in (("film_attend", "30", "hidden (30) must be a multiple of heads (4)"),
                                  ("pyramid", "8", "the pyramid head builds its levels from one stride")):
        out = tmp_path / f"refused-{head}"
        _one_line_error(CliRunner().invoke(train_main, [
            "--cache", str(cli_caches / "train.zarr"), "--noise-t", "5", "--head", head, "--hidden", hidden,
            "--out", str(out)]), f"cannot build head '{head}': {message}")
        assert not out.exists()
    _one_line_error(evaluate("--cache", str(tmp_path / "nope.zarr")), "nope.zarr")
    _one_line_error(CliRunner().invoke(eval_main, ["--run", str(tmp_path / "nothing"), "--cache",
                                                   str(cli_caches / "val.zarr")]), "does not exist")
    # a different head in an existing run
    result = CliRunner().invoke(train_main, ["--cache", str(cli_caches / "train.zarr"), "--noise-t", "5", "--head",
                                             "film", "--out", str(run), "--resume", "--hidden", "8"])
    _one_line_error(result, "trains head 'vpd', not 'film'")
    # a checkpoint that is not safetensors
    (run / "best.safetensors").write_bytes(b"\x80\x04\x95pickle")
    _one_line_error(evaluate("--cache", str(cli_caches / "val.zarr")), "not a valid safetensors file")


def _constant_head(run, bias):
    """Rewrite RUN/head.safetensors so the head outputs constant logits `bias` everywhere."""
    path = run / "head.safetensors"
    weights = load_file(str(path))
    weights["classifier.weight"] = torch.zeros_like(weights["classifier.weight"])
    weights["classifier.bias"] = torch.tensor(bias, dtype=weights["classifier.bias"].dtype)
    save_file(weights, str(path))


def _per_sample(path):
    return [{k: v if k == "sentence" else float(v) if k == "iou" else int(v) for k, v in r.items()}
            for r in csv.DictReader(open(path, newline=""))]


def test_protocols_compare_the_right_pixels_and_overlays(synth_root, tmp_path):
    from refseg.core.refer import ReferDataset

    refer = ReferDataset(synth_root, "refcoco-synth", "unc")
    make_cache(tmp_path / "train.zarr", 64, split="train", refer=refer,
               settings_override=settings("train", data_root=synth_root))
    run = tmp_path / "run"
    result = CliRunner().invoke(train_main, [
        "--cache", str(tmp_path / "train.zarr"), "--noise-t", "5", "--head", "vpd", "--out", str(run), "--epochs",
        "1", "--hidden", "8", "--preload"])
    assert result.exit_code == 0, result.output
    assert "preload: " in result.output and " GB for " in result.output

    def evaluate(protocol, *extra):
        r = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(tmp_path / "train.zarr"), "--checkpoint",
                                           "last", "--protocol", protocol, "--per-sample",
                                           str(tmp_path / f"{protocol}.csv"), *extra])
        assert r.exit_code == 0, r.output
        return _per_sample(tmp_path / f"{protocol}.csv")

    samples = {s.sent_id: s for s in refer.samples("train")}
    cache = open_cache(tmp_path / "train.zarr")
    gt_s = {int(sid): cache.gt(row) for row, sid in enumerate(cache.index["sent_id"])}

    # all foreground: I = |GT|, U = every pixel, at S x S (vpd) or at the original H x W with the union GT
    _constant_head(run, [0.0, 1.0])
    vpd, original = evaluate("vpd"), evaluate("original", "--overlays", str(tmp_path / "ov"), "--max-overlays", "3")
    assert len(vpd) == len(original) == cache.n_samples == 64
    differs = 0
    for a, b in zip(vpd, original):
        assert (a["i"], a["u"]) == (gt_s[a["sent_id"]].sum(), 64 * 64)
        s = samples[b["sent_id"]]
        union, rule_vpd = refer.mask(s.ref_id, rule="union"), refer.mask(s.ref_id, rule="vpd")
        assert (b["i"], b["u"]) == (union.sum(), union.size)
        differs += union.sum() != rule_vpd.sum()
    assert differs > 0  # some annotations are two overlapping polygons: the union rule was used

    # --overlay-pick best/worst draws the K samples of highest/lowest IoU (ties: lower sent_id), in that
    # order; --overlay-ids the given ones. All foreground: IoU = |GT| / S², which differs between samples.
    ranked = sorted(vpd, key=lambda a: (-a["iou"], a["sent_id"]))
    by_worst = sorted(vpd, key=lambda a: (a["iou"], a["sent_id"]))
    for pick, expected in (("best", ranked[:3]), ("worst", by_worst[:3])):
        evaluate("vpd", "--overlays", str(tmp_path / pick), "--overlay-pick", pick, "--max-overlays", "3")
        assert sorted(p.name for p in (tmp_path / pick).glob("*.png")) == [
            f"{k:03d}_sent{a['sent_id']}.png" for k, a in enumerate(expected)]
    assert ranked[0]["iou"] > by_worst[0]["iou"]
    ids = [vpd[9]["sent_id"], vpd[2]["sent_id"]]
    evaluate("vpd", "--overlays", str(tmp_path / "ids"), "--overlay-ids", f"{ids[0]}, {ids[1]}")
    assert sorted(p.name for p in (tmp_path / "ids").glob("*.png")) == [f"000_sent{ids[0]}.png",
                                                                         f"001_sent{ids[1]}.png"]
    for args, message in ((["--overlay-ids", "3,x"], "comma-separated sent_ids"),
                          (["--overlay-ids", "999999999"], "sent_id 999999999 not in cache"),
                          (["--overlay-ids", str(ids[0]), "--overlay-pick", "best"], "not both")):
        _one_line_error(CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(tmp_path / "train.zarr"),
                                                       "--overlays", str(tmp_path / "bad"), *args]), message)
    _one_line_error(CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(tmp_path / "train.zarr"),
                                                   "--overlay-pick", "worst"]), "need --overlays DIR")
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    # equal logits: ties go to background, so nothing is predicted and I = 0, U = |GT|
    _constant_head(run, [0.0, 0.0])
    for a in evaluate("vpd"):
        assert (a["i"], a["u"], a["iou"]) == (0, gt_s[a["sent_id"]].sum(), 0.0)

    pngs = sorted((tmp_path / "ov").glob("*.png"))
    assert len(pngs) == 3
    from refseg.heads.overlays import GT_COLOUR, PRED_COLOUR, legend

    image = np.asarray(Image.open(pngs[0]).convert("RGB")).astype(int)
    key = legend(96).height
    assert image.shape[1] == 96 and image.shape[0] > 96 + key  # the original size, a key and a caption strip
    body = image[key:key + 96]
    cyan = np.all(body == PRED_COLOUR, axis=-1)
    assert 0.2 < cyan.mean() < 0.6  # the all-foreground prediction: a cyan hatch over the whole image...
    assert np.all(body == GT_COLOUR, axis=-1).any()  # ...and the GT's white outline on top

    # the per-sample CSV: the metric columns first, then where each sample comes from
    header = open(tmp_path / "vpd.csv").readline().strip().split(",")
    assert header == ["sent_id", "ref_id", "iou", "i", "u", "image_id", "sentence"]
    row_of = {int(sid): row for row, sid in enumerate(cache.index["sent_id"])}
    for a in vpd:
        assert (a["image_id"], a["sentence"]) == (int(cache.index["image_id"][row_of[a["sent_id"]]]),
                                                  cache.texts[row_of[a["sent_id"]]])

    # a data root that is not there: one line, exit 2
    r = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(tmp_path / "train.zarr"), "--protocol",
                                       "original", "--data-root", str(tmp_path / "missing")])
    _one_line_error(r, "data root not found")


def test_per_sample_csv_quotes_sentences(tmp_path):
    from refseg.heads.evaluate import CSV_COLUMNS, _write_csv

    tricky = 'the red one, "left" of the star'
    _write_csv(tmp_path / "p.csv", [{"sent_id": 7, "ref_id": 3, "iou": 0.25, "i": 1, "u": 4, "image_id": 12,
                                      "sentence": tricky}])
    text = (tmp_path / "p.csv").read_text()
    assert text.splitlines()[1] == '7,3,0.250000,1,4,12,"the red one, ""left"" of the star"'
    rows = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert list(rows[0]) == CSV_COLUMNS and rows[0]["sentence"] == tricky
