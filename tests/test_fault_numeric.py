"""Features that do not fit the cache's float16 (issue 7, point 5): detected, reported naming the
sample, never stored, and the shard left unflagged.

Two ways to get there, each forced by scaling one UNet weight of a copy of the tiny backbone (the
stride-64 feature is that block's output):
- the backbone computes in fp32 and a feature exceeds 65504: the float16 conversion would turn it into
  inf; --dtype cannot help (the cache stores float16), and the message says so;
- the backbone computes in fp16 (`--dtype fp16`) and overflows to inf inside: the message suggests
  `--dtype bf16`, whose range is fp32's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.extract.cli import main
from refseg.extract.pipeline import ExtractionConfig, run_extraction
from refseg.core.errors import NonFiniteError


def scaled(backbone, factor: float, dtype=torch.float32):
    """A copy of `backbone` in `dtype` whose stride-64 feature is `factor` times larger."""
    out = copy.deepcopy(backbone)
    for module in (out.unet, out.vae, out.text_encoder):
        module.to(dtype)
    out.dtype = dtype
    with torch.no_grad():
        out.unet.up_blocks[0].resnets[1].conv2.weight.mul_(factor)
    return out


def args(synth_root, out) -> list[str]:
    return ["--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", "train", "--limit", "4",
            "--model", "tiny", "--noise-t", "0", "--out", str(out), "--image-size", "64", "--token-length", "16",
            "--shard-size", "2", "--quiet"]


def test_features_beyond_float16_are_refused_naming_the_sample(synth_root, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr("refseg.extract.pipeline.load_backbone", lambda *a, **k: scaled(tiny_backbone, 1e7))
    out = tmp_path / "C.zarr"
    result = CliRunner().invoke(main, args(synth_root, out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    cache = open_cache(out)
    first = int(cache.index["sent_id"][0])
    assert lines[0].startswith(f"error: features of sent_id {first} at T=0 overflow float16, the cache's storage "
                               "type (s64 reaches ")
    assert "> 65504); nothing of its shard was stored (the cache stores float16 whatever --dtype is" in lines[0]
    # stage 1 is kept; nothing of the UNet stage was stored or flagged
    assert cache.images_done().all() and cache.text_done().all()
    assert not cache.done(0).any()
    assert zarr.open_group(str(out), mode="r")["t0000/s64"].nchunks_initialized == 0


def test_fp16_backbone_overflow_suggests_bf16(synth_root, tiny_backbone, tmp_path):
    cfg = ExtractionConfig(data_root=str(synth_root), dataset="refcoco-synth", split="train", out=str(tmp_path / "C.zarr"),
                           noise_ts=(0,), image_size=64, token_length=16, limit=4, shard_size=2, progress=False)
    with pytest.raises(NonFiniteError) as err:
        run_extraction(cfg, backbone=scaled(tiny_backbone, 1e6, torch.float16))
    cache = open_cache(tmp_path / "C.zarr")
    first = int(cache.index["sent_id"][0])
    message = str(err.value)
    # the inf of the stride-64 block runs on as NaN into every finer level after it
    assert message.startswith(f"non-finite features (NaN/inf) for sent_id {first} at T=0 in s8, s16, s32, s64")
    assert message.endswith("nothing of its shard was stored (float16 overflow in the backbone: rerun with --dtype bf16)")
    assert cache.extraction_record["extraction"]["dtype"] == "float16" and not cache.done(0).any()


def test_the_same_backbone_unscaled_stores_finite_features(synth_root, tiny_backbone, tmp_path):
    """The control: without the scaled weight, the fp16 backbone extracts finite features."""
    cfg = ExtractionConfig(data_root=str(synth_root), dataset="refcoco-synth", split="train", out=str(tmp_path / "C.zarr"),
                           noise_ts=(0,), image_size=64, token_length=16, limit=4, shard_size=2, progress=False)
    run_extraction(cfg, backbone=scaled(tiny_backbone, 1.0, torch.float16))
    cache = open_cache(tmp_path / "C.zarr")
    assert cache.done(0).all()
    assert np.isfinite(cache.read_rows(0, slice(None), "s64").astype(np.float32)).all()
