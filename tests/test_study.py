"""The demo pipeline at a small size: every table row and every file it promises."""

import csv
import json

import numpy as np
import torch
from PIL import Image

from refseg.study.demo import DemoConfig, run_demo


def test_demo_writes_the_ablation_table_and_figures(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model="tiny", images=24, image_size=64, epochs=2, hidden=8,
                     batch_size=8, device="cpu", progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_demo(cfg)
        assert torch.get_num_threads() == 2  # the demo's 1 thread (its default) is undone afterwards
    finally:
        torch.set_num_threads(before)
    out = tmp_path / "demo"

    # one row per (head, T), in the report's layout, with metrics in percent
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["head"], int(r["noise_t"])) for r in rows] == [
        ("vpd", 0), ("vpd", 5), ("vpd", 500), ("film", 0), ("film", 5), ("film", 500)]
    for r in rows:
        values = [float(r[k]) for k in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")]
        assert all(0.0 <= v <= 100.0 for v in values)
        assert values[:5] == sorted(values[:5], reverse=True)  # P@X cannot grow with X
        assert int(r["n"]) == result["results"][0]["summary"]["n"] > 0
    table = (out / "ablation.md").read_text()
    assert "| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |" in table
    assert table.count("\n| 500 |") == 2

    # results.json holds the same numbers as the CSV
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "tiny" and saved["torch_threads"] == 1
    assert f"{saved['results'][4]['summary']['oIoU']:.2f}" == rows[4]["oIoU"]

    # every figure is a real, non-blank image
    for name in ("ablation.png", "curves.png", "noise_strip.png", "overlays.png", "features.png"):
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.shape[0] > 100 and img.shape[1] > 200, name
        assert img.std() > 5, f"{name} looks blank"

    # the caches hold the three noise levels; each run is a complete run directory
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / "cache" / f"{split}.zarr").glob("t[0-9][0-9][0-9][0-9]")) == ["t0000", "t0005", "t0500"]
    for r in result["results"]:
        run = out / "runs" / f"{r['head']}-t{r['noise_t']}"
        assert {"head.safetensors", "config.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
