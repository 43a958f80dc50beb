"""bench/gpu_check.sh --tiny: the GPU check's every step at tiny size on the CPU, so it cannot rot (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _check(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny", *flags], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    result = _check(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_step_runs_and_reports_figures(tiny_check):
    out, results = tiny_check
    steps = results["steps"]
    assert [s for s, v in steps.items() if v["status"] != "ok"] == [
        "c. torch.compile, whole UNet (bench/extract.py --compile on)",
        "c. torch.compile, the capture alone at batch 32 and 64 (bench/extract.py --compile on)",
        "c. CUDA graphs (torch.compile mode reduce-overhead)",  # GPU-only levers, skipped in tiny mode
        "d. VPD fixture in fp32 and bf16 (bench/vpd_fixture.py)"]  # its CPU variant is tests/test_vpd_import.py
    assert "7 skipped" in steps["a. correctness (pytest -m gpu)"]["summary"]  # no CUDA here
    e2e = steps["b. end to end through the CLI"]
    assert [c["exit"] for c in e2e["commands"]] == [0] * 8
    assert e2e["samples"] == {"train": 12, "val": 4}
    for head in ("vpd", "film"):
        summary = e2e["eval"][head]["summary"]
        assert summary["n"] == 4 and 0 <= summary["oIoU"] <= 100
    extract = next(c for c in e2e["commands"] if c["label"].startswith("refseg-extract train"))
    assert extract["peak_host_rss_mib"] > 100 and extract["wall_s"] > 0
    sizes = e2e["cache_bytes"]
    assert set(sizes) == {"spec_bytes_per_sample", "t0000_bytes_per_sample", "t0005_bytes_per_sample",
                          "t0500_bytes_per_sample"}
    for key in ("t0000", "t0005", "t0500"):  # uncompressed: the tensors plus the shard indexes and metadata
        ratio = sizes[f"{key}_bytes_per_sample"] / sizes["spec_bytes_per_sample"]
        assert ratio >= 1.0 and ratio < 1.5, (key, ratio)
    # one rank under torchrun (gloo here; NCCL + SyncBatchNorm on CUDA) trains exactly the one-process weights
    difference = steps["b. torchrun (DDP, NCCL on CUDA)"]["weight_difference_vs_one_process"]
    assert difference["max_abs"] == 0 and difference["max_relative"] == 0
    rows = steps["c. extraction throughput (bench/extract.py)"]["bench"]["sections"][2]["rows"]
    assert {r["variant"] for r in rows} == {"unet", "capture+host"} and all(r["samples/s"] > 0 for r in rows)
    train = steps["c. cached vs in-loop training (bench/train.py)"]["bench"]
    assert train["title"].startswith("Cached vs in-loop head training: tiny")
    sweep = steps["e. sweep: K heads in one pass vs K solo runs (bench/sweep.py)"]["results"][0]["rows"]
    assert [(r["case"], r["K"]) for r in sweep] == [("sd15-disk", 2)] and sweep[0]["ratio"] > 0
    families = steps["f. backbone families at 1024 px, random weights (bench/families.py)"]["results"]
    assert [(r["model"], r["batch"]) for r in families] == [("sdxl", 1), ("sdxl", 2), ("flux", 1), ("flux", 2)]
    assert all(r["flops_per_sample"] > 0 and r["samples_per_s"] > 0 for r in families)
    (scale,) = steps["g. the demo's study at 5x the data, 10 epochs, 6.6x the val set (bench/demo_scale.py)"]["results"]
    assert [(c["noise_t"], c["text_blind"], c["n_seeds"]) for c in scale["cells"]] == [
        (0, False, 2), (5, False, 2), (500, False, 2), (0, True, 2), (5, True, 2), (500, True, 2)]
    assert scale["chance"]["oIoU"] < scale["every_object"]["oIoU"] < 100 and len(scale["conclusions"]) > 3
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("### GPU check (tiny)") and "| refseg-extract train (T = 0, 5, 500) | 0 |" in text
    assert (out / "gpu_check.log").stat().st_size > 0


def test_a_spent_budget_skips_the_remaining_steps_and_still_writes_the_report(tmp_path):
    result = _check(tmp_path, "--budget", "1")
    assert result.returncode == 0, result.stderr
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert len(steps) == 13 and {s["status"] for s in steps.values()} == {"skipped"}
    assert "skipped (the check's time budget was spent)" in (tmp_path / "gpu_check.md").read_text()


def test_a_command_past_its_limit_is_killed_with_its_children(tmp_path):
    from bench.gpu_check import Check

    check = Check("tiny", tmp_path, budget=60)
    start = time.monotonic()
    cmd = check.run("sleeper", ["bash", "-c", "sleep 30 & sleep 30; echo never"], timeout=1)
    assert cmd.timed_out and cmd.returncode is None and not cmd.ok
    assert time.monotonic() - start < 10
    assert "killed: time limit" in (tmp_path / "gpu_check.log").read_text()
    assert subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True).returncode == 1  # none left
