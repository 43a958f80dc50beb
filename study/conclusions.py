"""The demo's conclusions, computed from its cells: every sentence of the study's text (the best cell
against chance and every object, what the sentence adds, noise levels per head, heads per T, the
seeds' spread against the val sampling), each difference called by `stats.verdict`."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np

from refseg.heads.evaluate import evaluate
from refseg.study.demo_config import DemoConfig
from refseg.study.errors import error_split
from refseg.study.references import (by_sentence_kind, chance_levels, compare_with_every_object,
                                     every_object_samples, scores, sentence as reference_sentence)
from refseg.study.stats import BOOTSTRAP_DRAWS, Z, bootstrap_std, interval, paired_bootstrap_std, verdict

RULE = (f"Rule: A beats B when the difference of their mean val oIoU exceeds {Z:g} standard errors: "
        "the seeds' spread of each (std²/n) and the val sampling of the difference (a paired bootstrap "
        f"over the val sentences, {BOOTSTRAP_DRAWS} resamples, first seeds), added in quadrature; "
        "otherwise no clear difference.")


def conclusions(cells: list[dict], val_cache: Path, out: Path, cfg: DemoConfig) -> dict:
    """Every sentence of the study's text, computed from the cells: best cell, what the sentence adds,
    chance, noise levels per head, heads per T, and seed spread against sampling spread."""
    with_text = [c for c in cells if not c.get("text_blind")]
    blind = {(c["head"], c["noise_t"]): c for c in cells if c.get("text_blind")}
    best = best_cell(cells)
    # 1. the references (every pixel, every object) and each cell's first seed scored per val sentence
    chance = chance_levels(val_cache)
    every_object = every_object_samples(val_cache, out / "data")
    objects = scores(every_object)
    scored = first_seed_samples(cells, val_cache, out / "per_sample", cfg.device)

    # 2. the rule, the best cell against the references, and every comparison the rule calls
    lines = [RULE, _best_cell_line(best, chance, objects)]
    compared, paired = _comparisons(with_text, blind, scored)
    lines += compared

    # 3. the sampling spread of one run (the best cell's first seed) against the seeds' spread
    sampling = bootstrap_std(*zip(*scored[cell_key(best)].values())) if cell_key(best) in scored else None
    stds = [float(c["oIoU_std"]) for c in with_text if math.isfinite(float(c["oIoU_std"]))]
    seed_std = float(np.mean(stds)) if stds else None  # None: one seed per cell, no spread to compare
    if sampling is not None and seed_std is not None:
        lines.append(_spread_line(seed_std, sampling, chance["n"], paired))

    # 4. the best cell and its no-sentence baseline against every object, on both metrics and per kind
    best_blind = blind.get((best["head"], best["noise_t"]))
    against = {"best": compare_with_every_object(best, objects)}
    if best_blind is not None:
        against["no sentence"] = compare_with_every_object(best_blind, objects)
    lines += [reference_sentence(cell_name(best) if k == "best" else cell_name(best_blind), v)
              for k, v in against.items()]
    kinds = None
    if best_blind is not None and cell_key(best) in scored and cell_key(best_blind) in scored:
        kinds = by_sentence_kind({cell_name(best): scored[cell_key(best)], "no sentence": scored[cell_key(best_blind)],
                                  "every object": every_object}, val_cache)
    run = Path(best["runs"][0]) if best.get("runs") else None
    return {"lines": lines, "by_kind": kinds, "best": {k: best[k] for k in ("head", "noise_t")},
            "best_run": str(run) if run else None,
            "best_csv": str(out / "per_sample" / csv_name(best)), "chance": chance, "every_object": objects,
            "seed_std": seed_std, "against_every_object": against,
            "errors": error_split(cells, val_cache, out / "data", cfg.device),
            "sampling_std": sampling, "paired_sampling_std": paired,
            "rule": f"|mean_a - mean_b| > {Z:g}·sqrt(std_a²/n_a + std_b²/n_b + paired_sampling_std²)"}


def _best_cell_line(best: dict, chance: dict, objects: dict) -> str:
    lo, _ = interval(best)
    return (f"Best cell: {cell_name(best)}, val oIoU {best['oIoU_mean']:.1f} ± {best['oIoU_std']:.1f} "
            f"({int(best['n_seeds'])} seeds); predicting every pixel gives {chance['oIoU']:.1f} "
            f"({'below' if chance['oIoU'] < lo else 'not clearly below'} the best cell's interval); "
            f"predicting every object of the image, the sentence unread, gives {objects['oIoU']:.1f} "
            f"({'below' if objects['oIoU'] < lo else 'not clearly below'} it).")


def _comparisons(with_text: list[dict], blind: dict, scored: dict) -> tuple[list[str], list[float]]:
    """The verdicts, in the text's order: what the sentence adds (a cell against its no-sentence
    baseline, which has the sentence removed from the backbone and the head), noise levels per head,
    heads per T; and the val sampling std of each difference called, in the same order."""
    lines, paired = [], []

    def call(a, b, name_a, name_b):  # the rule, with the val sampling of this pair's difference
        pair = (scored.get(cell_key(a)), scored.get(cell_key(b)))
        paired.append(paired_bootstrap_std(*pair) if all(pair) else 0.0)
        return verdict(a, b, name_a, name_b, sampling=paired[-1])

    for c in with_text:
        if (c["head"], c["noise_t"]) in blind:
            baseline = blind[(c["head"], c["noise_t"])]
            lines.append("What the sentence adds: " + call(c, baseline, cell_name(c), "its no-sentence baseline"))
    for head in dict.fromkeys(c["head"] for c in with_text):
        row = [c for c in with_text if c["head"] == head]
        lines += [f"Noise, head {head}: " + call(a, b, f"T={a['noise_t']}", f"T={b['noise_t']}")
                  for a, b in itertools.combinations(row, 2)]
    for t in dict.fromkeys(c["noise_t"] for c in with_text):
        col = [c for c in with_text if c["noise_t"] == t]
        lines += [f"Heads at T={t}: " + call(a, b, a["head"], b["head"]) for a, b in itertools.combinations(col, 2)]
    return lines, paired


def _spread_line(seed_std: float, sampling: float, n: int, paired: list[float]) -> str:
    dominant = "the seeds' spread dominates" if seed_std >= sampling else \
        "the val sample count dominates (more --images would narrow it)"
    return (f"Spread: std of val oIoU over seeds {seed_std:.2f} (mean over cells); sampling std of one "
            f"run's oIoU over the {n} val sentences {sampling:.2f} (bootstrap, "
            f"{BOOTSTRAP_DRAWS} resamples): {dominant}. Paired on the same sentences, the sampling "
            f"std of the differences above is smaller (median {np.median(paired):.2f}), and the "
            "rule counts it.")


def best_cell(cells: list[dict], metric: str = "oIoU") -> dict:
    """The cell of highest mean (the first such in table order)."""
    with_text = [c for c in cells if not c.get("text_blind")] or cells
    return max(with_text, key=lambda c: float(c[f"{metric}_mean"]))


def cell_name(cell: dict) -> str:
    """'film T=5', or 'film T=5 no sentence' for a no-sentence baseline."""
    return f"{cell['head']} T={cell['noise_t']}" + (" no sentence" if cell.get("text_blind") else "")


def cell_key(cell: dict) -> tuple:
    return (cell["head"], int(cell["noise_t"]), bool(cell.get("text_blind")))


def csv_name(cell: dict) -> str:
    return f"{cell['head']}-t{cell['noise_t']}{'-no-sentence' if cell.get('text_blind') else ''}.csv"


def first_seed_samples(cells: list[dict], val_cache: Path, folder: Path, device: str) -> dict:
    """cell_key(cell) -> {sent_id: (i, u)} of the cell's first seed on val (its CSV in `folder`, as
    `refseg-eval --per-sample` writes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for cell in cells:
        if not cell.get("runs"):
            continue
        path = folder / csv_name(cell)
        evaluate(cell["runs"][0], cell.get("val_cache", val_cache), per_sample=path, device=device)
        with open(path, newline="") as f:
            out[cell_key(cell)] = {int(r["sent_id"]): (int(r["i"]), int(r["u"])) for r in csv.DictReader(f)}
    return out
