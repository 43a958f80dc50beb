"""End-to-end extraction on the tiny backbone and the synthetic data (docs/DESIGN.md §5, §6)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from _cache_util import store_files
from refseg.cache import open_cache
from refseg.cache.writer import CacheWriter
from refseg.backbones.capture import UNetCapture
from refseg.extract.pipeline import run_extraction
from refseg.core.noise import add_noise, alphas_cumprod, make_noise


@pytest.fixture(scope="module")
def reference_cache(extract_config, tiny_backbone, tmp_path_factory):
    """The uninterrupted run at batch size 4 every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "C.zarr"
    report = run_extraction(extract_config(out), backbone=tiny_backbone)
    return out, report


def test_cache_contents_follow_the_spec(reference_cache):
    out, report = reference_cache
    cache = open_cache(out)
    assert cache.noise_levels == [0, 5]
    assert report.n_samples == cache.n_samples > 8
    for t in (0, 5):
        assert cache.done(t).all()
        sample = cache.read(t, 0)
        for info in cache.spec.tensors:
            assert sample[info.name].shape == info.shape and sample[info.name].dtype == np.float16
    assert cache.spec["s8"].shape[1:] == (8, 8) and cache.spec["attn_s16"].shape == (16, 4, 4)
    # index is sorted by image, one row per sentence
    image_id = cache.index["image_id"]
    assert (np.diff(image_id) >= 0).all()
    # attention maps are probabilities over the L tokens at every pixel
    attn = cache.read(5, 0)["attn_s32"].astype(np.float32)
    assert np.allclose(attn.sum(axis=0), 1.0, atol=5e-3)


def test_stored_features_equal_the_unet_run_on_stored_inputs(reference_cache, tiny_backbone):
    """Noise is sqrt(ab)·z0 + sqrt(1-ab)·ε with ε seeded by (seed, image_id, T); features = the capture."""
    out, _ = reference_cache
    cache = open_cache(out)
    t, rows = 5, [0, 3]
    z0 = torch.from_numpy(cache.latents(cache.index["image_row"][rows])).float()
    eps = torch.stack([make_noise(tuple(z0.shape[1:]), 0, int(cache.index["image_id"][r]), t) for r in rows])
    acp = alphas_cumprod(tiny_backbone.scheduler_config)
    zt = add_noise(z0, t, eps, acp)
    expected_zt = acp[t].sqrt().float() * z0 + (1 - acp[t]).sqrt().float() * eps
    torch.testing.assert_close(zt, expected_zt, rtol=1e-6, atol=1e-6)
    emb = torch.from_numpy(cache.embeddings(rows)).float()
    with torch.inference_mode(), UNetCapture(tiny_backbone.unet, cache.spec) as cap:
        got = cap.run(zt, torch.full((2,), t), emb)
    for name in cache.spec.names:
        stored = np.stack([cache.read(t, r)[name] for r in rows]).astype(np.float32)
        np.testing.assert_allclose(stored, got[name].numpy(), rtol=2e-3, atol=2e-3)


def test_bytes_do_not_depend_on_batch_size(reference_cache, extract_config, tiny_backbone, tmp_path):
    out, _ = reference_cache
    run_extraction(extract_config(tmp_path / "b1.zarr", batch_size=1), backbone=tiny_backbone)
    assert store_files(tmp_path / "b1.zarr") == store_files(out)


def test_interrupted_then_resumed_equals_uninterrupted(reference_cache, extract_config, tiny_backbone, tmp_path,
                                                      monkeypatch):
    out, _ = reference_cache
    calls = {"n": 0}
    original = CacheWriter.write_features

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(5, "Input/output error (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_features", failing)
    with pytest.raises(OSError, match="injected"):
        run_extraction(extract_config(tmp_path / "r.zarr"), backbone=tiny_backbone)
    partial = open_cache(tmp_path / "r.zarr")
    assert 0 < partial.done(0).sum() < partial.n_samples  # some shards landed, the rest did not
    monkeypatch.setattr(CacheWriter, "write_features", original)
    report = run_extraction(extract_config(tmp_path / "r.zarr"), backbone=tiny_backbone)
    assert report.computed["vae (images)"] == 0 and report.computed["text encoder (sentences)"] == 0
    assert store_files(tmp_path / "r.zarr") == store_files(out)


def test_new_noise_level_reuses_latents_and_embeddings(reference_cache, extract_config, tiny_backbone, tmp_path,
                                                        monkeypatch):
    out, _ = reference_cache
    one = tmp_path / "one.zarr"
    run_extraction(extract_config(one, noise_ts=(0,)), backbone=tiny_backbone)
    counts = {"vae": 0, "text": 0}
    vae_encode, text_forward = tiny_backbone.vae.encode, tiny_backbone.text_encoder.forward

    def count(key, fn):
        def wrapped(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tiny_backbone.vae, "encode", count("vae", vae_encode))
    monkeypatch.setattr(tiny_backbone.text_encoder, "forward", count("text", text_forward))
    report = run_extraction(extract_config(one, noise_ts=(0, 5)), backbone=tiny_backbone)
    assert counts == {"vae": 0, "text": 0}
    assert report.computed["unet T=5"] == report.n_samples and report.computed["unet T=0"] == 0
    # the same bytes as extracting both levels in one run
    assert store_files(one) == store_files(out)


def test_command_line_and_plain_zarr(synth_root, tmp_path):
    out = tmp_path / "C.zarr"
    cmd = [sys.executable, "-m", "refseg.extract", "--data-root", str(synth_root), "--dataset", "refcoco-synth",
           "--split", "val", "--model", "tiny", "--noise-t", "0", "--noise-t", "5", "--out", str(out),
           "--image-size", "64", "--token-length", "16", "--limit", "6", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cache: 6 samples" in done.stdout
    assert "wrote" not in done.stderr  # --quiet: no line saying where it wrote
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)  # all done: resumes at once
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"wrote {out}: `refseg-cache info {out}` says what it holds"
    root = zarr.open_group(str(out), mode="r")  # no refseg involved
    assert root["t0005/s16"].shape[0] == 6 and root["t0005/done"][:].all()
    assert root.attrs["refseg_cache"] == 3 and root["t0000"].attrs["noise_t"] == 0  # format 3: checksums, zstd masks

    # a different setting on the same store: refused with one line, exit 2, the store untouched
    before = store_files(out)
    bad = subprocess.run(cmd[:-3] + ["--token-length", "12", "--limit", "6", "--quiet"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "token_length" in bad.stderr and "--overwrite" in bad.stderr
    assert store_files(out) == before


def test_bad_flags_exit_2_with_one_line(synth_root, tmp_path):
    base = [sys.executable, "-m", "refseg.extract", "--data-root", str(synth_root), "--dataset", "refcoco-synth",
            "--out", str(tmp_path / "x.zarr"), "--image-size", "64", "--quiet"]
    for extra, needle in [(["--split", "nope"], "nope"), (["--split", "val", "--model", "/no/such/model"], "accepts"),
                          (["--split", "val", "--noise-t", "1000"], "0..999"),
                          (["--split", "val", "--shard", "3/2"], "--shard")]:
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (extra, done.stderr)
        assert done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
