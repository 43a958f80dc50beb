"""The demo's report under --out: ablation.md (the table, the conclusions, where the errors are, the
probe's table), ablation.csv and the figures; and `machine`, what the table was measured on."""

from __future__ import annotations

import csv
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import click

from refseg.cache import open_cache
from refseg.core.refer import ReferDataset
from refseg.core.transforms import load_image
from refseg.heads.evaluate import predict
from refseg.study import figures
from refseg.study.conclusions import cell_name
from refseg.study.demo_config import DemoConfig
from refseg.study.errors import split_markdown


def machine() -> dict:
    """What the table was measured on: the CPU's model name (Linux), its usable cores, the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def write_report(out: Path, cells: list[dict], study: dict, probe: dict, val_cache_path: Path, backbone,
                 cfg: DemoConfig) -> dict:
    """Write the report's files under `out` and print the table and the conclusions; -> name -> path."""
    cache = open_cache(val_cache_path)
    refer = ReferDataset(str(out / "data"), "refcoco-synth")
    files = {}
    table = figures.ablation_markdown(cells)
    where = machine()
    text = "\n".join(f"- {line}" for line in study["lines"])
    probe_md = probe["markdown"]
    files["ablation.md"] = out / "ablation.md"
    kinds = f"### Val oIoU by kind of sentence (first seeds)\n\n{study['by_kind']}\n" if study.get("by_kind") else ""
    errors = f"### Where the errors are (val, mean over seeds)\n\n{split_markdown(study['errors'])}\n"
    files["ablation.md"].write_text(
        f"# Noise ablation on refcoco-synth val (mean ± std over {cfg.seeds} seeds)\n\n"
        f"Measured on {where['cpu']} ({where['cores']} cores), {cfg.threads} torch threads, {where['date']}. "
        "Another machine or thread count gives other digits; the conclusions below are what should hold.\n\n"
        f"{table}\n## Conclusions (computed from the table)\n\n{text}\n\n{kinds}{errors}"
        f"## Zero-shot attention probe (val, no training)\n\n{probe_md}\n")
    files["ablation.csv"] = figures.write_ablation_csv(cells, out / "ablation.csv")
    files["ablation.png"] = figures.plot_ablation(cells, out / "ablation.png", chance=study["chance"],
                                                   every_object=study["every_object"])
    files["curves.png"] = figures.plot_curves(
        {cell_name(c): [Path(r) for r in c["runs"]] for c in cells if c["runs"]}, out / "curves.png")

    # The best cell's first seed supplies the overlays; its noise level the feature view.
    best = study["best"]
    if study["best_run"]:
        with open(study["best_csv"], newline="") as f:
            ious = {int(rec["sent_id"]): float(rec["iou"]) for rec in csv.DictReader(f)}
        records = [dict(p, iou=ious[p["sent_id"]]) for p in predict(study["best_run"], cache, device=cfg.device)]
        files["overlays.png"] = figures.overlay_grid(
            records, cache, refer.image_path, out / "overlays.png",
            title=f"head {best['head']}, T={best['noise_t']} (the best cell, seed 0): best (top) and worst "
                  "(bottom) val samples by IoU")

    row = 0
    image_path = refer.image_path(int(cache.index["image_id"][row]))
    files["noise_strip.png"] = figures.noise_strip(backbone, cache, row, cfg.noise_ts, image_path,
                                                   out / "noise_strip.png")
    ids = cache.input_ids([row])[0]
    tokens = [tok.replace("</w>", "") for tok in backbone.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
    files["features.png"] = figures.feature_view(cache, best["noise_t"], row, tokens, out / "features.png",
                                                 image=load_image(image_path))
    click.echo(f"{table}\n{text}\n\n{kinds}{errors}{probe_md}")
    return files
