"""bench/families.py works: its --tiny CPU mode prints one JSON line per model and batch (the GPU run is the lead's)."""

from __future__ import annotations

import json

import torch

from bench import families


def test_tiny_mode_prints_one_json_line_per_model_and_batch(capsys):
    rows = families.main(["--tiny", "--image-size", "32", "--batch-sizes", "1,2", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == rows
    assert [(r["model"], r["batch"]) for r in rows] == [("sdxl", 1), ("sdxl", 2), ("flux", 1), ("flux", 2)]
    for model in ("sdxl", "flux"):
        one, two = (r for r in rows if r["model"] == model)
        assert one["flops_per_sample"] > 0 and one["flops_per_sample"] == two["flops_per_sample"]  # per sample
        assert one["samples_per_s"] > 0 and one["peak_memory_bytes"] is None  # no device memory on the CPU
    flux = rows[2]
    assert flux["tensors"] == ["d01_s16", "x01_s16", "x02_s16", "attn_d01_s16", "attn_x01_s16", "attn_x02_s16"]
    assert rows[0]["tensors"] == ["s8", "s16", "s32", "attn_s16", "attn_s32"]


def test_materialise_initialises_every_weight_in_place():
    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))

    a = families.materialise(families.on_meta(build), "cpu", torch.bfloat16, seed=3)
    b = families.materialise(families.on_meta(build), "cpu", torch.bfloat16, seed=3)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and torch.isfinite(p).all() for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # deterministic from the seed
    assert torch.equal(a[1].weight, torch.ones(32, dtype=torch.bfloat16)) and not a[0].bias.any()
    std = a[0].weight.float().std().item()
    assert 0.08 < std < 0.17  # N(0, 1/fan_in): 1/sqrt(64) = 0.125
