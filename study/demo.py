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

Why seeds and a computed verdict: single runs of the old demo ranked T = 0 and T = 5 differently from
one machine to the next (issue 13). A difference is called only where the seeds' intervals separate
(`verdict`), so the conclusions, not the digits, are what another machine or thread count reproduces.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

import click
import numpy as np

from refseg.core.cli import cli

if TYPE_CHECKING:
    from refseg.extract.config import ExtractionConfig

BASELINES = ("best", "all", "none")
Z = 2.0  # intervals are mean ± Z·std/√n: two standard errors
BOOTSTRAP_DRAWS = 1000


@dataclass
class DemoConfig:
    """The study's settings; `refseg-report demo` has an option for each field with `cli` metadata."""

    out: str = field(default="demo-out", metadata=cli(type=click.Path()))
    model: str = field(default="auto", metadata=cli("auto = tiny-synth when shipped, else tiny."))
    # 600 images give 335 val sentences. Measured 2026-11-26 (BENCHMARKS.md, demo rows): one run's oIoU
    # has a sampling std of ~1.2 points there (bootstrap), above the seeds' spread (~0.5), so the val
    # size dominates an absolute number; the seeds dominating would take ~6x the val sentences, beyond
    # the 10-minute budget. Comparisons are paired on the same sentences (sampling std of a difference
    # ~0.9) and `verdict` counts both. 600 training sentences keep 27 heads within the budget.
    images: int = field(default=600, metadata=cli("Synthetic images (70% train, 10% val by image)."))
    train_samples: int | None = field(default=600, metadata=cli(
        "Extract and train on the first N train sentences only (the val split is used whole)."))
    image_size: int = field(default=128, metadata=cli())
    token_length: int = 16  # the synthetic sentences are short; RefCOCO uses 40
    noise_ts: tuple[int, ...] = field(default=(0, 5, 500),
                                      metadata=cli("Noise levels.", flag="--noise-t", type=int, multiple=True))
    heads: tuple[str, ...] = field(default=("vpd", "film"),
                                   metadata=cli("Heads to train.", flag="--head", type=str, multiple=True))
    seeds: int = field(default=3, metadata=cli("Seeds (head initialisations) per (head, T)."))
    baseline: str = field(default="best", metadata=cli(
        "Text-blind baseline for the best head, for every head, or none.", type=click.Choice(BASELINES)))
    epochs: int = field(default=6, metadata=cli())
    # 32: the decoders' convolutions are most of the sweep's time, and 32 channels train twice as fast as
    # 64 with the same val oIoU on this world (BENCHMARKS.md, demo rows); VPD uses 640
    hidden: int = field(default=32, metadata=cli("Head width (VPD: 640)."))
    cache_dtype: str = field(default="fp16", metadata=cli(
        "Storage type of the study's caches (refseg-extract --cache-dtype).",
        type=click.Choice(["fp16", "fp32", "int8"])))
    loss: str = "ce+dice"  # issue 13: Dice helps the small objects of the synthetic world
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0  # the dataset's seed and the sweep's data order
    device: str = field(default="auto", metadata=cli())
    # Across CPUs the conclusions, not the digits, hold: another CPU rounds differently (BENCHMARKS.md,
    # demo rows); the seeds' spread is much larger than that. On one CPU every --threads gives the same
    # bytes: each process computes on one thread (`cpu_processes`).
    threads: int | None = field(default=2, metadata=cli(
        "CPU threads: extraction and the sweep run as that many one-thread processes, so every count gives the "
        "same caches and table on one CPU."))
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a setting the study cannot use before anything is written under --out (one line)."""
        from refseg.core.errors import RefsegError
        from refseg.heads.registry import HEADS, head_names

        for flag, value, low in (("--images", self.images, 1), ("--image-size", self.image_size, 32),
                                 ("--epochs", self.epochs, 1), ("--hidden", self.hidden, 1),
                                 ("--threads", self.threads, 1), ("--seeds", self.seeds, 1),
                                 ("--train-samples", self.train_samples, 1)):
            if value is not None and value < low:
                raise RefsegError(f"{flag} must be at least {low} (got {value})")
        if not self.heads or any(h not in HEADS for h in self.heads):
            raise RefsegError(f"--head takes {', '.join(head_names())} (got {', '.join(self.heads) or 'none'})")
        if not self.noise_ts:
            raise RefsegError("--noise-t needs at least one noise level")
        if self.baseline not in BASELINES:
            raise RefsegError(f"--baseline takes {', '.join(BASELINES)} (got {self.baseline!r})")

    def extraction(self, split: str, model: str, prompt: str = "sentence") -> ExtractionConfig:
        """The extraction of one split of the study's data; `prompt="empty"`: the no-sentence baseline's."""
        from refseg.extract.config import ExtractionConfig

        out = Path(self.out)
        name = split if prompt == "sentence" else f"{split}-no-sentence"
        return ExtractionConfig(data_root=str(out / "data"), dataset="refcoco-synth", split=split, prompt=prompt,
                                cache_dtype=self.cache_dtype,
                                out=str(out / "cache" / f"{name}.zarr"), model=model, noise_ts=self.noise_ts,
                                image_size=self.image_size, token_length=self.token_length,
                                batch_size=self.batch_size, device=self.device, progress=self.progress,
                                limit=self.train_samples if split == "train" else None)

    def grid(self, heads, text_blind: bool) -> dict:
        """The sweep's grid: every (head, T, seed), the rest fixed."""
        return {"head": list(heads), "noise_t": list(self.noise_ts), "seed": list(range(self.seeds)),
                "text_blind": text_blind, "hidden": self.hidden, "epochs": self.epochs, "lr": self.lr,
                "optimizer": self.optimizer, "loss": self.loss, "batch_size": self.batch_size,
                "device": self.device, "preload": True}  # the demo's caches fit in RAM


# The fields without a command-line option (`refseg-report demo` has --quiet for `progress`).
NOT_OPTIONS = ("token_length", "loss", "batch_size", "lr", "optimizer", "seed", "progress", "timings")


def resolve_model(model: str) -> str:
    if model != "auto":
        return model
    from refseg.backbones.loading import TINY_SYNTH_DIR

    return "tiny-synth" if (TINY_SYNTH_DIR / "model_index.json").exists() else "tiny"


def say(cfg: DemoConfig, message: str) -> None:
    if cfg.progress:
        click.echo(message, err=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole study; returns {"cells": [sweep summary rows], "study": {...}, "files": {...}, "model"}."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig) -> dict:
    from refseg.backbones.loading import load_backbone
    from refseg.core.paths import check_output_path
    from refseg.core.synthetic import generate
    from refseg.extract.pipeline import run_extraction

    # every setting is checked before anything is written under --out
    cfg.check()
    check_output_path(cfg.out, "the study's folder")
    out = Path(cfg.out)
    model = resolve_model(cfg.model)
    backbone = load_backbone(model, device=cfg.device)
    extractions = {split: cfg.extraction(split, model) for split in ("train", "val")}
    if cfg.baseline != "none":  # the baseline's features: the empty prompt (one denoiser run per image)
        extractions.update({f"{split}-no-sentence": cfg.extraction(split, model, prompt="empty")
                            for split in ("train", "val")})
    for extraction in extractions.values():
        extraction.check()
        extraction.check_for_model(backbone.max_stride, backbone.max_token_length, backbone.schedule_steps)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        cfg.timings[name] = round(now - clock, 1)
        clock = now

    say(cfg, f"[1/5] synthetic dataset ({cfg.images} images) -> {out / 'data'}")
    generate(out / "data", images=cfg.images, seed=cfg.seed, image_size=cfg.image_size)
    lap("data")

    say(cfg, f"[2/5] extraction with --model {model} at T = {', '.join(map(str, cfg.noise_ts))}")
    caches = {split: Path(extraction.out) for split, extraction in extractions.items()}
    processes = cpu_processes(cfg)
    if processes > 1:
        seconds = extract_in_processes(list(extractions.values()), processes)
        for (split, path), took in zip(caches.items(), seconds):
            say(cfg, f"{split}: {describe_store(path)}, {took:.0f} s by {processes} one-thread processes")
    else:
        with extraction_threads(cfg.threads):
            for extraction in extractions.values():
                say(cfg, "\n".join(run_extraction(extraction, backbone=backbone).lines()))
    lap("extract")

    say(cfg, "[3/5] zero-shot attention probe on val")
    probe = run_probe(caches["val"], cfg.noise_ts)
    lap("probe")

    n_runs = cfg.seeds * len(cfg.noise_ts) * (len(cfg.heads) * (2 if cfg.baseline == "all" else 1)
                                              + (cfg.baseline == "best"))
    say(cfg, f"[4/5] sweep: {n_runs} heads ({', '.join(cfg.heads)} × T × {cfg.seeds} seeds, no-sentence "
             f"baseline: {cfg.baseline}), {cfg.epochs} epochs each")
    cells = sweep(cfg, caches, out / "sweep", cfg.heads, text_blind=False)
    if cfg.baseline != "none":
        best = best_cell(cells)
        heads = cfg.heads if cfg.baseline == "all" else (best["head"],)
        no_sentence = {split: caches[f"{split}-no-sentence"] for split in ("train", "val")}
        cells += sweep(cfg, no_sentence, out / "sweep-no-sentence", heads, text_blind=True)
    lap("sweep")

    say(cfg, "[5/5] conclusions, table and figures")
    study = conclusions(cells, caches["val"], out, cfg)
    files = write_report(out, cells, study, probe, caches["val"], backbone, cfg)
    lap("figures")
    import torch

    (out / "results.json").write_text(json.dumps(
        {"model": model, "cells": cells, "study": study, "probe": probe, "timings_s": cfg.timings,
         "torch_threads": torch.get_num_threads(), "machine": machine()}, indent=2, sort_keys=True, default=str))
    return {"cells": cells, "study": study, "files": files, "model": model}


@contextmanager
def extraction_threads(threads: int | None):
    """Extraction runs on at most the usable cores less one: its cache-writer thread needs a core, and
    torch's OpenMP threads spin while one of them waits for it (docs/TROUBLESHOOTING.md). The sweep,
    with its caches preloaded, has no such thread and gets all `threads`."""
    import torch

    from refseg.core.cli import default_threads

    before = torch.get_num_threads()
    torch.set_num_threads(min(threads or before, default_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_processes(cfg: DemoConfig) -> int:
    """On the CPU, extraction and the sweep run as `threads` one-thread processes. The tiny backbone and
    the demo's decoders are too small to keep two threads busy, and extraction ran on one thread beside
    its cache writer: on 2 cores two one-thread processes extract 1.55x and train 1.08-1.3x faster
    (BENCHMARKS.md, "Sweep" and the demo rows). The bytes are those of one thread, whatever the split,
    so every --threads gives the same caches and table on one CPU (tests/test_study.py)."""
    from refseg.core.device import resolve_device

    return (cfg.threads or 1) if resolve_device(cfg.device).type == "cpu" else 1


def extract_in_processes(extractions: list[ExtractionConfig], processes: int) -> list[float]:
    """Every extraction (split) by `processes` spawned one-thread processes, process i filling shard part
    (i, processes) of each store (extract/pipeline.py: the parts finish stage one together, then each
    runs the UNet on its own shards); -> each store's seconds (its slowest part). A store left
    incomplete (a part failed) is refused in one line; rerunning resumes it."""
    from refseg.core.processes import run_in_processes

    seconds_by_part = run_in_processes(_extract_part, [(extractions, (i, processes)) for i in range(processes)])
    for extraction in extractions:
        describe_store(extraction.out, require_complete=True)
    return [max(part_seconds) for part_seconds in zip(*seconds_by_part)]


def describe_store(path, require_complete: bool = False) -> str:
    """'600 samples, 107 images, T = 0, 5, 500 complete' for a demo cache."""
    from refseg.cache import open_cache
    from refseg.core.errors import CacheError

    cache = open_cache(path)
    levels = cache.noise_levels
    unfinished = [t for t in levels if not cache.done(t).all()]
    if require_complete and unfinished:
        raise CacheError(f"{path}: noise level(s) {', '.join(map(str, unfinished))} unfinished after extraction; "
                         "rerun the demo with the same --out to resume")
    state = "complete" if not unfinished else f"unfinished at T = {', '.join(map(str, unfinished))}"
    return f"{cache.n_samples} samples, {len(cache.images_done())} images, T = {', '.join(map(str, levels))} {state}"


def _extract_part(extractions: list[ExtractionConfig], part: tuple[int, int]) -> list[float]:
    """One spawned process's part of every split (its own backbone, one torch thread)."""
    import dataclasses

    import torch

    from refseg.backbones.loading import load_backbone
    from refseg.extract.pipeline import run_extraction

    torch.set_num_threads(1)
    first = extractions[0]
    backbone = load_backbone(first.model, device=first.device)
    seconds = []
    for extraction in extractions:
        only_part_0_shows_progress = extraction.progress and part[0] == 0
        report = run_extraction(dataclasses.replace(extraction, shard=part, progress=only_part_0_shows_progress),
                                backbone=backbone)
        seconds.append(report.seconds)
    return seconds


# ---- the sweep -----------------------------------------------------------------------------------

def sweep(cfg: DemoConfig, caches: dict, out: Path, heads, *, text_blind: bool) -> list[dict]:
    """One pass of refseg-sweep over (head, T, seed); -> its summary rows, one per (head, T), with the
    runs of each row under "runs" (paths, by seed)."""
    from refseg.heads.sweep import run_sweep

    rows = run_sweep(cfg.grid(heads, text_blind), caches["train"], caches["val"], out, data_seed=cfg.seed,
                     progress=cfg.progress, threads=cfg.threads, processes=cpu_processes(cfg))
    runs = runs_by_cell(out / "runs")
    cells = []
    for row in rows:
        key = (row["head"], int(row["noise_t"]), text_blind)
        stds = {k: float("nan") if row[k] == "" else float(row[k]) for k in row if k.endswith("_std")}  # '': 1 seed
        cells.append(dict(row, **stds, head=row["head"], noise_t=int(row["noise_t"]), text_blind=text_blind,
                          val_cache=str(caches["val"]),
                          runs=[str(p) for p in runs.get(key, [])]))
    order = {(h, t): k for k, (h, t) in enumerate(itertools.product(cfg.heads, cfg.noise_ts))}
    return sorted(cells, key=lambda c: order[(c["head"], c["noise_t"])])


def runs_by_cell(runs_dir: Path) -> dict[tuple, list[Path]]:
    """(head, T, text_blind) -> the run directories under `runs_dir`, by seed (from each config.json)."""
    from refseg.heads.run_dir import read_config

    found: dict[tuple, list] = {}
    for run in sorted(p for p in runs_dir.iterdir() if (p / "config.json").exists()):
        c = read_config(run)
        blind = bool(c.get("text_blind", False))  # runs from before --text-blind lack the key
        found.setdefault((c["head"], int(c["noise_t"]), blind), []).append((int(c.get("seed", 0)), run))
    return {k: [run for _, run in sorted(v)] for k, v in found.items()}


def best_cell(cells: list[dict], metric: str = "oIoU") -> dict:
    """The cell of highest mean (the first such in table order)."""
    with_text = [c for c in cells if not c.get("text_blind")] or cells
    return max(with_text, key=lambda c: float(c[f"{metric}_mean"]))


# ---- the probe -----------------------------------------------------------------------------------

def run_probe(val_cache: Path, noise_ts) -> dict:
    """The zero-shot attention probe on val: {"rows", "markdown"}, or {"missing": why}."""
    try:
        from refseg.study.probe import probe_attention, probe_table_md
    except ImportError as exc:
        return {"missing": f"the attention probe is not available ({exc})"}
    from refseg.cache import open_cache

    rows = probe_attention(open_cache(val_cache), noise_ts=tuple(noise_ts))
    return {"rows": rows, "markdown": probe_table_md(rows)}


# ---- conclusions, computed -----------------------------------------------------------------------

def interval(cell: dict, metric: str = "oIoU") -> tuple[float, float]:
    """mean ± Z·std/√n over the cell's seeds (no width with one seed: nothing can then be called)."""
    mean, std, n = float(cell[f"{metric}_mean"]), float(cell[f"{metric}_std"]), int(cell["n_seeds"])
    if n < 2 or not math.isfinite(std):
        return (-math.inf, math.inf)
    half = Z * std / math.sqrt(n)
    return (mean - half, mean + half)


def verdict(a: dict, b: dict, name_a: str, name_b: str, metric: str = "oIoU", sampling: float = 0.0) -> str:
    """'A beats B' only where the difference of the means exceeds Z standard errors, otherwise 'no clear
    difference'. The standard error adds the seeds' spread of each (std²/n) and `sampling`, the val
    sampling std of the difference (a paired bootstrap over the val sentences). With `sampling` 0 this
    is the intervals mean ± Z·std/√n, combined in quadrature; with one seed nothing is called."""
    ma, mb = float(a[f"{metric}_mean"]), float(b[f"{metric}_mean"])
    se2 = sampling ** 2
    for cell in (a, b):
        std, n = float(cell[f"{metric}_std"]), int(cell["n_seeds"])
        se2 = se2 + (std ** 2 / n if n > 1 and math.isfinite(std) else math.inf)
    if abs(ma - mb) > Z * math.sqrt(se2):
        winner, loser = ((name_a, ma), (name_b, mb)) if ma > mb else ((name_b, mb), (name_a, ma))
        return f"{winner[0]} beats {loser[0]} ({winner[1]:.1f} vs {loser[1]:.1f})"
    return f"{name_a} vs {name_b}: no clear difference ({ma:.1f} vs {mb:.1f})"


def _oiou_draws(i: np.ndarray, u: np.ndarray, picks: np.ndarray) -> np.ndarray:
    return 100 * i[picks].sum(1) / np.maximum(u[picks].sum(1), 1)


def _picks(n: int, draws: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_std(intersections, unions, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """The sampling std of oIoU (%) of one run: resample the val sentences with replacement, recompute."""
    i, u = np.asarray(intersections, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    return float(_oiou_draws(i, u, _picks(len(i), draws, seed)).std(ddof=1))


def paired_bootstrap_std(a: dict, b: dict, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """The sampling std of the oIoU difference of two runs scored on the same val sentences: both are
    resampled with the same draws, so what the two share (easy and hard sentences) cancels.
    `a`, `b`: {sent_id: (i, u)}; only the sentences both hold count."""
    ids = sorted(set(a) & set(b))
    ia, ua = (np.array([a[k][j] for k in ids], dtype=np.float64) for j in (0, 1))
    ib, ub = (np.array([b[k][j] for k in ids], dtype=np.float64) for j in (0, 1))
    picks = _picks(len(ids), draws, seed)
    return float((_oiou_draws(ia, ua, picks) - _oiou_draws(ib, ub, picks)).std(ddof=1))


def conclusions(cells: list[dict], val_cache: Path, out: Path, cfg: DemoConfig) -> dict:
    """Every sentence of the study's text, computed from the cells: best cell, what the sentence adds,
    chance, noise levels per head, heads per T, and seed spread against sampling spread."""
    with_text = [c for c in cells if not c.get("text_blind")]
    blind = {(c["head"], c["noise_t"]): c for c in cells if c.get("text_blind")}
    best = best_cell(cells)
    name = lambda c: f"{c['head']} T={c['noise_t']}" + (" no sentence" if c.get("text_blind") else "")  # noqa: E731
    from refseg.study.errors import error_split
    from refseg.study.references import (by_sentence_kind, chance_levels, compare_with_every_object,
                                         every_object_samples, scores, sentence as reference_sentence)

    chance = chance_levels(val_cache)
    every_object = every_object_samples(val_cache, out / "data")
    objects = scores(every_object)
    scored = first_seed_samples(cells, val_cache, out / "per_sample", cfg.device)

    paired = []  # the val sampling std of each difference called

    def call(a, b, name_a, name_b):  # the rule, with the val sampling of this pair's difference
        pair = (scored.get(_key(a)), scored.get(_key(b)))
        paired.append(paired_bootstrap_std(*pair) if all(pair) else 0.0)
        return verdict(a, b, name_a, name_b, sampling=paired[-1])

    lines = [f"Rule: A beats B when the difference of their mean val oIoU exceeds {Z:g} standard errors: "
             "the seeds' spread of each (std²/n) and the val sampling of the difference (a paired bootstrap "
             f"over the val sentences, {BOOTSTRAP_DRAWS} resamples, first seeds), added in quadrature; "
             "otherwise no clear difference."]
    lo, _ = interval(best)
    lines.append(f"Best cell: {name(best)}, val oIoU {best['oIoU_mean']:.1f} ± {best['oIoU_std']:.1f} "
                 f"({int(best['n_seeds'])} seeds); predicting every pixel gives {chance['oIoU']:.1f} "
                 f"({'below' if chance['oIoU'] < lo else 'not clearly below'} the best cell's interval); "
                 f"predicting every object of the image, the sentence unread, gives {objects['oIoU']:.1f} "
                 f"({'below' if objects['oIoU'] < lo else 'not clearly below'} it).")
    for c in with_text:
        if (c["head"], c["noise_t"]) in blind:
            # the baseline has the sentence removed from the backbone (the empty prompt) and from the head
            lines.append("What the sentence adds: " + call(c, blind[(c["head"], c["noise_t"])], name(c),
                                                            "its no-sentence baseline"))
    for head in dict.fromkeys(c["head"] for c in with_text):
        row = [c for c in with_text if c["head"] == head]
        lines += [f"Noise, head {head}: " + call(a, b, f"T={a['noise_t']}", f"T={b['noise_t']}")
                  for a, b in itertools.combinations(row, 2)]
    for t in dict.fromkeys(c["noise_t"] for c in with_text):
        col = [c for c in with_text if c["noise_t"] == t]
        lines += [f"Heads at T={t}: " + call(a, b, a["head"], b["head"]) for a, b in itertools.combinations(col, 2)]

    # sampling spread of one run (the best cell's first seed) against the seeds' spread
    run = Path(best["runs"][0]) if best.get("runs") else None
    sampling = None
    if _key(best) in scored:
        i, u = zip(*scored[_key(best)].values())
        sampling = bootstrap_std(i, u)
    stds = [float(c["oIoU_std"]) for c in with_text if math.isfinite(float(c["oIoU_std"]))]
    seed_std = float(np.mean(stds)) if stds else None  # None: one seed per cell, no spread to compare
    if sampling is not None and seed_std is not None:
        dominant = "the seeds' spread dominates" if seed_std >= sampling else \
            "the val sample count dominates (more --images would narrow it)"
        lines.append(f"Spread: std of val oIoU over seeds {seed_std:.2f} (mean over cells); sampling std of one "
                     f"run's oIoU over the {chance['n']} val sentences {sampling:.2f} (bootstrap, "
                     f"{BOOTSTRAP_DRAWS} resamples): {dominant}. Paired on the same sentences, the sampling "
                     f"std of the differences above is smaller (median {np.median(paired):.2f}), and the "
                     "rule counts it.")
    kinds = None  # the best cell (it reads the sentence), its no-sentence baseline and every object, per kind
    best_blind = blind.get((best["head"], best["noise_t"]))
    against = {"best": compare_with_every_object(best, objects)}
    if best_blind is not None:
        against["no sentence"] = compare_with_every_object(best_blind, objects)
    lines += [reference_sentence(name(best) if k == "best" else name(best_blind), v) for k, v in against.items()]
    if best_blind is not None and _key(best) in scored and _key(best_blind) in scored:
        kinds = by_sentence_kind({name(best): scored[_key(best)], "no sentence": scored[_key(best_blind)],
                                  "every object": every_object}, val_cache)
    return {"lines": lines, "by_kind": kinds, "best": {k: best[k] for k in ("head", "noise_t")},
            "best_run": str(run) if run else None,
            "best_csv": str(out / "per_sample" / csv_name(best)), "chance": chance, "every_object": objects,
            "seed_std": seed_std, "against_every_object": against,
            "errors": error_split(cells, val_cache, out / "data", cfg.device),
            "sampling_std": sampling, "paired_sampling_std": paired,
            "rule": f"|mean_a - mean_b| > {Z:g}·sqrt(std_a²/n_a + std_b²/n_b + paired_sampling_std²)"}


def csv_name(cell: dict) -> str:
    return f"{cell['head']}-t{cell['noise_t']}{'-no-sentence' if cell.get('text_blind') else ''}.csv"


def _key(cell: dict) -> tuple:
    return (cell["head"], int(cell["noise_t"]), bool(cell.get("text_blind")))


def first_seed_samples(cells: list[dict], val_cache: Path, folder: Path, device: str) -> dict:
    """_key(cell) -> {sent_id: (i, u)} of the cell's first seed on val (its CSV in `folder`, as
    `refseg-eval --per-sample` writes it)."""
    from refseg.heads.evaluate import evaluate

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for cell in cells:
        if not cell.get("runs"):
            continue
        path = folder / csv_name(cell)
        evaluate(cell["runs"][0], cell.get("val_cache", val_cache), per_sample=path, device=device)
        with open(path, newline="") as f:
            out[_key(cell)] = {int(r["sent_id"]): (int(r["i"]), int(r["u"])) for r in csv.DictReader(f)}
    return out


def machine() -> dict:
    """What the table was measured on: the CPU's model name (Linux), its usable cores, the date (UTC)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


# ---- the report ----------------------------------------------------------------------------------

def write_report(out: Path, cells: list[dict], study: dict, probe: dict, val_cache_path: Path, backbone,
                 cfg: DemoConfig) -> dict:
    from refseg.cache import open_cache
    from refseg.core.refer import ReferDataset
    from refseg.core.transforms import load_image
    from refseg.heads.evaluate import predict
    from refseg.study import figures
    from refseg.study.errors import split_markdown

    cache = open_cache(val_cache_path)
    refer = ReferDataset(str(out / "data"), "refcoco-synth")
    files = {}
    table = figures.ablation_markdown(cells)
    where = machine()
    text = "\n".join(f"- {line}" for line in study["lines"])
    probe_md = probe.get("markdown") or probe.get("missing", "")
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
        {f"{c['head']} T={c['noise_t']}" + (" no sentence" if c["text_blind"] else ""): [Path(r) for r in c["runs"]]
         for c in cells if c["runs"]}, out / "curves.png")

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
