"""The report's Table 4 study end to end, as a study whose conclusions hold: synthetic data -> caches at
T = 0, 5, 500 -> a zero-shot attention probe -> a sweep of heads × T × seeds, with a no-sentence
baseline -> a table of mean ± std, conclusions computed from it, and figures.

    refseg-report demo --out demo-out

Everything lands under one folder:
    data/                     the synthetic RefCOCO-format dataset
    cache/{train,val}.zarr    one store per split, a group per noise level (the backbone runs once per T)
    cache/*-no-sentence.zarr  the same images with the empty prompt (--prompt empty): the baseline's features
    sweep/runs/<name>/        one run per (head, T, seed); sweep-no-sentence/ the no-sentence baseline (the
                              best head, text-blind, on the empty prompt's features: the sentence removed
                              from the backbone and the head)
    per_sample/<cell>.csv     each cell's first seed scored per val sentence (the bootstraps read these)
    ablation.md/.csv/.png     the table (val, mean ± std over seeds), the conclusions, the probe's table
    curves.png noise_strip.png features.png overlays.png

The study's parts: `demo_config` (the settings), `demo_processes` (extraction and the sweep as one-thread
processes), `stats` (intervals, verdicts, bootstraps), `conclusions` (the text computed from the table),
`references` (every pixel, every object), `errors` (the error split), `demo_report` and `figures`.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from refseg.backbones.loading import load_backbone
from refseg.cache import open_cache
from refseg.cache.fingerprint import OVERWRITE_ADVICE
from refseg.core.cli import say
from refseg.core.errors import CacheMismatchError
from refseg.core.paths import check_output_path
from refseg.core.synthetic import generate
from refseg.heads.run_dir import read_config
from refseg.heads.sweep import run_sweep
from refseg.study.conclusions import best_cell, conclusions
from refseg.study.demo_config import SPLITS, DemoConfig, resolve_model
from refseg.study.demo_processes import cpu_processes, run_extractions
from refseg.study.demo_report import machine, write_report
from refseg.study.probe import probe_attention, probe_table_md


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole study; returns {"cells": [sweep summary rows], "study": {...}, "files": {...}, "model"}."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig) -> dict:
    # 0. every setting is checked before anything is written under --out
    cfg.check()
    check_output_path(cfg.out, "the study's folder")
    out, model = Path(cfg.out), resolve_model(cfg.model)
    backbone = load_backbone(model, device=cfg.device)
    extractions = cfg.extractions(model)
    for extraction in extractions.values():
        extraction.check_for_model(backbone.max_stride, backbone.max_token_length, backbone.schedule_steps)
    out.mkdir(parents=True, exist_ok=True)
    lap = _Laps(cfg.timings)

    # 1. the synthetic dataset
    say(f"[1/5] synthetic dataset ({cfg.images} images) -> {out / 'data'}", enabled=cfg.progress)
    generate(out / "data", images=cfg.images, seed=cfg.seed, image_size=cfg.image_size)
    lap("data")

    # 2. the caches: each split at every T, and the no-sentence baseline's (the empty prompt)
    say(f"[2/5] extraction with --model {model} at T = {', '.join(map(str, cfg.noise_ts))}", enabled=cfg.progress)
    try:
        caches = run_extractions(cfg, extractions, backbone)
    except CacheMismatchError as exc:  # say what this command can do about it: it has no --overwrite
        raise CacheMismatchError(f"{str(exc).removesuffix(OVERWRITE_ADVICE)}: {out} holds a study of another "
                                 "backbone or other settings (tiny-synth's weights change with refseg); "
                                 "remove that folder or choose another --out") from None
    lap("extract")

    # 3. the zero-shot attention probe
    say("[3/5] zero-shot attention probe on val", enabled=cfg.progress)
    probe = run_probe(caches["val"], cfg.noise_ts)
    lap("probe")

    # 4. the sweep of heads × T × seeds, then the no-sentence baseline
    cells = sweep_study(cfg, caches, out)
    lap("sweep")

    # 5. the conclusions, the report and results.json
    say("[5/5] conclusions, table and figures", enabled=cfg.progress)
    study = conclusions(cells, caches["val"], out, cfg)
    files = write_report(out, cells, study, probe, caches["val"], backbone, cfg)
    lap("figures")
    (out / "results.json").write_text(json.dumps(
        {"model": model, "cells": cells, "study": study, "probe": probe, "timings_s": cfg.timings,
         "torch_threads": torch.get_num_threads(), "machine": machine()}, indent=2, sort_keys=True, default=str))
    return {"cells": cells, "study": study, "files": files, "model": model}


class _Laps:
    """Each step's seconds into `timings` (name -> s, one decimal), counted from the end of the step before."""

    def __init__(self, timings: dict):
        self.timings, self.clock = timings, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 1)
        self.clock = now


# ---- the sweep -----------------------------------------------------------------------------------

def sweep_study(cfg: DemoConfig, caches: dict, out: Path) -> list[dict]:
    """The study's sweep: every head × T × seed, then the no-sentence baseline (text-blind heads on the
    empty prompt's features) for the best head or every head (--baseline); -> the cells, in table order."""
    n_runs = cfg.seeds * len(cfg.noise_ts) * (len(cfg.heads) * (2 if cfg.baseline == "all" else 1)
                                              + (cfg.baseline == "best"))
    say(f"[4/5] sweep: {n_runs} heads ({', '.join(cfg.heads)} × T × {cfg.seeds} seeds, no-sentence "
        f"baseline: {cfg.baseline}), {cfg.epochs} epochs each", enabled=cfg.progress)
    cells = sweep(cfg, caches, out / "sweep", cfg.heads, text_blind=False)
    if cfg.baseline != "none":
        heads = cfg.heads if cfg.baseline == "all" else (best_cell(cells)["head"],)
        no_sentence = {split: caches[f"{split}-no-sentence"] for split in SPLITS}
        cells += sweep(cfg, no_sentence, out / "sweep-no-sentence", heads, text_blind=True)
    return cells


def sweep(cfg: DemoConfig, caches: dict, out: Path, heads, *, text_blind: bool) -> list[dict]:
    """One pass of refseg-sweep over (head, T, seed); -> its summary rows, one per (head, T), with the
    runs of each row under "runs" (paths, by seed)."""
    rows = run_sweep(cfg.grid(heads, text_blind), caches["train"], caches["val"], out, data_seed=cfg.seed,
                     progress=cfg.progress, threads=cfg.threads, processes=cpu_processes(cfg))
    cells = cells_of(rows, out / "runs", caches["val"], text_blind)
    order = {(h, t): k for k, (h, t) in enumerate(itertools.product(cfg.heads, cfg.noise_ts))}
    return sorted(cells, key=lambda c: order[(c["head"], c["noise_t"])])


def cells_of(rows: list[dict], runs_dir: Path, val_cache: Path, text_blind: bool) -> list[dict]:
    """A sweep's summary rows as the study's cells: each std a float (NaN for one seed, which the summary
    leaves empty), T an int, and the runs of each (head, T) under "runs" (paths, by seed)."""
    runs = runs_by_cell(runs_dir)
    cells = []
    for row in rows:
        key = (row["head"], int(row["noise_t"]), text_blind)
        stds = {k: float("nan") if row[k] == "" else float(row[k]) for k in row if k.endswith("_std")}
        cells.append(dict(row, **stds, noise_t=int(row["noise_t"]), text_blind=text_blind, val_cache=str(val_cache),
                          runs=[str(p) for p in runs.get(key, [])]))
    return cells


def runs_by_cell(runs_dir: Path) -> dict[tuple, list[Path]]:
    """(head, T, text_blind) -> the run directories under `runs_dir`, by seed (from each config.json)."""
    found: dict[tuple, list] = {}
    for run in sorted(p for p in runs_dir.iterdir() if (p / "config.json").exists()):
        c = read_config(run)
        found.setdefault((c["head"], int(c["noise_t"]), bool(c["text_blind"])), []).append((int(c["seed"]), run))
    return {k: [run for _, run in sorted(v)] for k, v in found.items()}


# ---- the probe -----------------------------------------------------------------------------------

def run_probe(val_cache: Path, noise_ts) -> dict:
    """The zero-shot attention probe on val: {"rows", "markdown"}."""
    rows = probe_attention(open_cache(val_cache), noise_ts=tuple(noise_ts))
    return {"rows": rows, "markdown": probe_table_md(rows)}
