"""`refseg-import vpd` and `refseg-predict` against VPD's own forward pass (tests/fixtures/vpd-tiny).

Tolerances are those the fixture's README states: fp32 end to end rel <= 1e-4, the adapter on the
recorded CLIP output rel <= 1e-6, with the float16 cache rel <= 2e-3; a mask pixel may flip only where
VPD's margin |l1 - l0| is below 1e-3 (fp32) or 1e-2 (float16 cache).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from _vpd_util import BASE, CKPT, DATASET_NAME, FIXTURE, write_fixture_dataset

TENSORS = {"latent": "latents", "embedding": "c_crossattn", "s8": "s8", "s16": "s16", "s32": "s32", "s64": "s64",
           "attn_s16": "attn_s16", "attn_s32": "attn_s32"}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def pairs(io):
    return [(str(FIXTURE / "images" / f"sample{i}.png"), str(io["sentences"][i])) for i in range(len(io["mask"]))]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from refseg.study.vpd_run import import_vpd

    out = tmp_path_factory.mktemp("vpd") / "imported"
    return out, import_vpd(CKPT, str(BASE), out).table()


def flips_only_near_ties(pred, io, bound):
    """Number of flipped pixels; asserts each has a VPD margin below `bound`."""
    flipped = np.asarray(pred, bool) != io["mask"].astype(bool)
    margin = np.abs(io["logits"][:, 1] - io["logits"][:, 0])
    assert (margin[flipped] < bound).all(), margin[flipped].max()
    return int(flipped.sum())


def test_import_cli_prints_the_table(tmp_path):
    from refseg.study.cli_import import main

    out = tmp_path / "imported"
    result = CliRunner().invoke(main, ["vpd", str(CKPT), "--base-model", str(BASE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| UNet (fine-tuned) | 1,086,692 |" in result.output and "refseg-eval --run" in result.output


def test_import_writes_backbone_and_run(imported):
    from refseg.backbones.loading import load_backbone
    from refseg.heads.run_dir import read_config

    out, text = imported
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_adapter"} <= {
        p.name for p in (out / "model").iterdir()}
    assert (out / "run" / "head.safetensors").is_file()
    for part in ("UNet (fine-tuned) | 1,086,692", "VAE encoder + quant convs | 221,636", "text adapter", "VAE decoder",
                 "vpd head", "not read: optimizer, epoch, lr_scheduler"):
        assert part in text
    cfg = read_config(out / "run")
    assert (cfg["head"], cfg["noise_t"], cfg["timestep"], cfg["head_args"]["hidden"]) == ("vpd", 0, 1, 16)
    ex = cfg["cache"]["settings"]["extraction"]
    assert (ex["image_size"], ex["token_length"], ex["latent_scaling"], ex["attn_strides"]) == (256, 40, "none", [16, 32])
    backbone = load_backbone(str(out / "model"), device="cpu")
    assert backbone.text_adapter is not None and "text_adapter" in backbone.identity
    assert "text_adapter" not in load_backbone(str(BASE), device="cpu").identity  # no adapter: identity as before


def test_adapter_on_recorded_clip_output(imported, io):
    from refseg.backbones.text_adapter import load_text_adapter

    adapter = load_text_adapter(imported[0] / "model")
    assert rel(adapter.gamma.detach(), io["gamma"]) == 0
    with torch.no_grad():
        c = adapter(torch.from_numpy(io["l_feats"]))
    assert rel(c, io["c_crossattn"]) <= 1e-6


def test_fp32_forward_matches_vpd(imported, io, pairs):
    from refseg.study.predict import predict_pairs

    out = imported[0]
    preds = predict_pairs(str(out / "model"), out / "run", pairs, device="cpu", dtype="fp32", store_dtype=torch.float32)
    for p, ids, am in zip(preds, io["input_ids"], io["attention_mask"]):
        assert (p.tensors["input_ids"].numpy() == ids).all() and (p.tensors["attention_mask"].numpy() == am).all()
    for ours, theirs in TENSORS.items():
        assert rel(torch.stack([p.tensors[ours] for p in preds]), io[theirs]) <= 1e-4, ours
    assert rel(torch.stack([p.logits for p in preds]), io["logits_lowres"]) <= 1e-4
    flips_only_near_ties(np.stack([p.mask for p in preds]), io, 1e-3)


@pytest.fixture(scope="module")
def cache_path(imported, tmp_path_factory):
    from refseg.extract.config import ExtractionConfig, with_preset
    from refseg.extract.pipeline import run_extraction

    root = write_fixture_dataset(tmp_path_factory.mktemp("data"))
    cache = root / "val.zarr"
    cfg = ExtractionConfig(data_root=str(root), dataset=DATASET_NAME, split="val", model=str(imported[0] / "model"),
                           image_size=256, device="cpu", dtype="fp32", out=str(cache), progress=False)
    run_extraction(with_preset(cfg, "vpd", {"image_size", "device", "dtype"}))  # = refseg-extract --preset vpd
    return cache


def test_cache_path_matches_vpd(imported, cache_path, io):
    from refseg.cache import open_cache
    from refseg.heads.evaluate import evaluate, predict

    cache = open_cache(cache_path)
    assert [int(i) for i in cache.index["sent_id"]] == [10, 11]  # the fixture's order
    assert rel(cache.latents([0, 1]).astype(np.float32), io["latents"]) <= 2e-3
    assert rel(cache.embeddings([0, 1]).astype(np.float32), io["c_crossattn"]) <= 2e-3
    for name in ("s8", "s16", "s32", "s64", "attn_s16", "attn_s32"):
        assert rel(cache.read_rows(0, [0, 1], name).astype(np.float32), io[name]) <= 2e-3, name
    masks = np.stack([p["pred"] for p in predict(imported[0] / "run", cache_path, device="cpu")])
    flips_only_near_ties(masks, io, 1e-2)
    summary = evaluate(imported[0] / "run", cache_path, device="cpu")  # what refseg-eval --run prints
    gt, vpd = cache.gt([0, 1]) != 0, io["mask"].astype(bool)
    vpd_oiou = 100 * (gt & vpd).sum() / (gt | vpd).sum()  # VPD's own masks scored on the cached GT
    assert summary["n"] == 2 and abs(summary["oIoU"] - vpd_oiou) < 0.1


def test_fp32_cache_path_flips_no_pixel(io, tmp_path):
    """refseg-import vpd + refseg-extract --preset vpd --dtype fp32 --cache-dtype fp32 + refseg-eval: VPD's masks.

    Through bench/vpd_fixture.py, the script the GPU check runs in bf16 and fp32 on CUDA."""
    from bench.vpd_fixture import run_variant

    result = run_variant("cpu", "fp32", "fp32", tmp_path, io)
    assert max(result["relative_error"].values()) <= 1e-4, result["relative_error"]
    assert result["flipped_pixels"] == 0 and result["pixels"] == io["mask"].size


def test_predict_cli_equals_cache_path(imported, cache_path, io, pairs, tmp_path):
    from refseg.heads.evaluate import predict
    from refseg.study.cli_predict import main
    from refseg.study.predict import predict_pairs

    out = imported[0]
    cached = [p["pred"] for p in predict(out / "run", cache_path, device="cpu")]
    ours = predict_pairs(str(out / "model"), out / "run", pairs, device="cpu", dtype="fp32", batch_size=2)
    for a, b in zip(ours, cached):
        assert (a.mask == b).all()
    args = ["--model", str(out / "model"), "--run", str(out / "run"), "--device", "cpu", "--dtype", "fp32",
            "--out", str(tmp_path / "pred")]
    for image, text in pairs:
        args += ["--image", image, "--text", text]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["settings"]["extraction"]["image_size"] == 256 and record["settings"]["timestep"] == 1
    for p, r in zip(ours, record["predictions"]):
        png = np.asarray(Image.open(tmp_path / "pred" / r["mask"]))
        assert png.shape == Image.open(p.image).size[::-1] and set(np.unique(png)) <= {0, 255}
        assert (png == 255).sum() == r["mask_area"] == p.mask_original.sum() > 0
        assert (tmp_path / "pred" / r["overlay"]).is_file()


def test_predict_cli_reads_pairs_csv(imported, pairs, tmp_path):
    from refseg.study.cli_predict import main

    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("image,text\n" + "".join(f"{i},{t}\n" for i, t in pairs))
    out = imported[0]
    result = CliRunner().invoke(main, ["--model", str(out / "model"), "--run", str(out / "run"), "--device", "cpu",
                                       "--pairs", str(csv_file), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    # DESIGN §9: stdout holds the predictions, stderr's last line names what was written (none with --quiet)
    assert "wrote" not in result.stdout and len(result.stdout.splitlines()) == len(pairs)
    assert result.stderr.splitlines()[-1] == f"wrote {tmp_path / 'p' / 'predictions.json'}"
    assert len(json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"]) == len(pairs)


def _forward(model_dir: Path, run: Path, pairs):
    """Features of `pairs` with a backbone folder, bypassing the run's identity check (negative controls)."""
    from refseg.backbones.loading import load_backbone
    from refseg.heads.evaluate import load_head
    from refseg.heads.run_dir import read_config
    from refseg.study.predict import LoadedRun, predict_loaded

    cfg = read_config(run)
    ex = cfg["cache"]["settings"]["extraction"]
    backbone = load_backbone(str(model_dir), device="cpu", dtype="fp32")
    head = load_head(run, "best", "cpu")[0]
    spec = backbone.spec(ex["image_size"], ex["token_length"], tuple(ex["strides"]), tuple(ex["attn_strides"]))
    return predict_loaded(LoadedRun(backbone, head, cfg, ex, spec, "last"), pairs, store_dtype=torch.float32)


def test_base_unet_or_missing_adapter_is_caught(imported, io, pairs, tmp_path):
    """What a wrong importer produces is far outside the bounds, and the run refuses such a backbone."""
    from refseg.core.errors import ModelError
    from refseg.study.predict import load_run

    wrong_unet, no_adapter = tmp_path / "wrong_unet", tmp_path / "no_adapter"
    shutil.copytree(imported[0] / "model", wrong_unet)
    shutil.rmtree(wrong_unet / "unet")
    shutil.copytree(BASE / "unet", wrong_unet / "unet")
    shutil.copytree(imported[0] / "model", no_adapter)
    shutil.rmtree(no_adapter / "text_adapter")
    run = imported[0] / "run"
    base = _forward(wrong_unet, run, pairs)
    assert rel(torch.stack([p.tensors["s8"] for p in base]), io["s8"]) > 1e-2
    plain = _forward(no_adapter, run, pairs)
    assert rel(torch.stack([p.tensors["embedding"] for p in plain]), io["c_crossattn"]) > 1e-1
    for folder, key in ((wrong_unet, "weights_sha256"), (no_adapter, "text_adapter")):
        with pytest.raises(ModelError, match=key):
            load_run(str(folder), run, device="cpu", dtype="fp32")


def test_hostile_checkpoint_is_refused_without_running(tmp_path):
    from refseg.study.cli_import import main

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {"gamma": torch.zeros(2)}, "args": Payload()}, hostile)
    from refseg.backbones.safe_checkpoint import read_checkpoint
    from refseg.core.errors import ModelError

    with pytest.raises(ModelError, match="refusing to load checkpoint"):
        read_checkpoint(hostile)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["vpd", str(hostile), "--base-model", str(BASE), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and not marker.exists()
    assert "refusing to load checkpoint" in result.output and len(result.output.strip().splitlines()) == 1


def test_non_vpd_checkpoint_exits_2_with_one_line(tmp_path):
    from refseg.study.cli_import import main

    other = tmp_path / "other.pth"
    torch.save({"model": {"backbone.conv.weight": torch.zeros(1)}, "epoch": 3}, other)
    from refseg.backbones.vpd_import import read_vpd_checkpoint
    from refseg.core.errors import ModelError

    with pytest.raises(ModelError, match="not a VPD referring-segmentation checkpoint: missing encoder_vq.*unet.unet"):
        read_vpd_checkpoint(other)
    result = CliRunner().invoke(main, ["vpd", str(other), "--base-model", str(BASE), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "not a VPD" in line and "gamma" in line and "unet.unet.diffusion_model" in line


def test_an_older_torch_is_refused_in_one_line_before_reading(monkeypatch):
    import torch

    from refseg.backbones import safe_checkpoint
    from refseg.core.errors import ModelError

    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(ModelError, match=r"needs torch >= 2\.6 \(this is 2\.5\.1\+cu121\)"):
        safe_checkpoint.read_checkpoint(FIXTURE / "vpd_refer.pth")


def test_predict_says_what_it_changed_or_refused(imported, pairs, tmp_path, monkeypatch):
    """Issue 23: an empty sentence in --pairs names its line; a sentence longer than the run's tokens is
    cut with a warning; a 10000² image is predicted without a decompression warning, its overlay drawn
    downscaled; a full disk leaves no 0-byte PNG; the overlay's key has no "ground truth" entry."""
    from refseg.study.cli_predict import main

    out = imported[0]
    base = ["--model", str(out / "model"), "--run", str(out / "run"), "--device", "cpu"]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(f"image,text\n{pairs[0][0]},the cat\n{pairs[1][0]},  \n")
    result = CliRunner().invoke(main, [*base, "--pairs", str(csv_file), "--out", str(tmp_path / "p0")])
    assert result.exit_code == 2 and f"{csv_file}:3: the sentence for image" in result.stderr, result.output

    huge = tmp_path / "huge.png"
    Image.new("RGB", (10000, 10000), (90, 120, 40)).save(huge)  # one colour: a small file, 10^8 pixels
    long = " ".join(["red"] * 300)
    result = CliRunner().invoke(main, [*base, "--image", str(huge), "--text", long, "--out", str(tmp_path / "p1")])
    assert result.exit_code == 0, result.output
    assert "DecompressionBombWarning" not in result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: pair 1")]
    assert warning and "cut to the run's token length" in warning[0] and "red red" in warning[0], result.stderr
    record = json.loads((tmp_path / "p1" / "predictions.json").read_text())["predictions"][0]
    assert (record["height"], record["width"]) == (10000, 10000)
    assert Image.open(tmp_path / "p1" / record["overlay"]).size[0] == 1024  # drawn downscaled (+ key, caption)
    assert "Token indices sequence length" not in result.output

    from refseg.heads import overlays

    key = np.asarray(overlays.legend(400, with_gt=False))
    assert key.shape[0] == np.asarray(overlays.legend(400)).shape[0]  # one row either way here
    assert not np.array_equal(key, np.asarray(overlays.legend(400)))  # the ground-truth entry is gone

    def full(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    result = CliRunner().invoke(main, [*base, "--image", pairs[0][0], "--text", pairs[0][1], "--out",
                                       str(tmp_path / "p2")])
    assert result.exit_code == 2 and "No space left on device (ENOSPC)" in result.stderr, result.output
    assert not [p for p in (tmp_path / "p2").iterdir() if p.suffix == ".png" or p.name.endswith(".tmp")]
