"""Levers on the demo's study, measured one at a time on a reduced demo (issue 26): T = 0 only (the
demo's best noise level), `film`-like heads, 2 seeds, the no-sentence baseline on the empty prompt's
caches, everything else the demo's (tiny-synth, data generator, ce+dice, Adam 1e-3, hidden 32).

    python bench/demo_levers.py --work /tmp/levers --lever base --lever film_up
    python bench/demo_levers.py --work /tmp/levers --image-size 192 --lever base

`--work` keeps the data and caches of each (images, train samples, image size) so that levers of
training and of the head reuse one extraction. Each lever prints one JSON line: the cells' mean ±
std over seeds (oIoU, mIoU, P@0.5), every object's oIoU and mIoU, the error split
(study/errors.py) and the sweep's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A lever: the sweep grid's changes from the demo's (a list value sweeps that axis in the same pass).
LEVERS = {
    "base": {},
    "film_up": {"head": ["film_up"]},
    "film_up_shuffle": {"head": ["film_up"], "upsample": "shuffle"},
    "film_up_coords": {"head": ["film_up"], "coords": True},
    "film_up_attn": {"head": ["film_up"], "attn_text": 8},
    "film_up_both": {"head": ["film_up"], "coords": True, "attn_text": 8},
    "film_attend": {"head": ["film_attend"]},
    "film_attend_3": {"head": ["film_attend"], "levels": 3},
    "epochs12": {"epochs": 12},
    "lr3e-3": {"lr": 3e-3},
    "lr3e-4": {"lr": 3e-4},
    "adamw": {"optimizer": "adamw", "lr": 1e-3},
    "hidden64": {"hidden": 64},
    "batch8": {"batch_size": 8},
    "ce": {"loss": "ce"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--lever", action="append", default=[], help=f"one of {', '.join(LEVERS)}; repeat")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--train-samples", type=int, default=600)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="auto",
                   help="the backbone (a diffusers folder: a retrained tiny-synth); caches are kept apart by its folder name")
    p.add_argument("--sentences", choices=["all", "first"], default="all",
                   help="first: one sentence per train ref, so the train samples come from more images (val whole)")
    return p.parse_args(argv)


def prepare(cfg, sentences: str = "all") -> tuple[dict, float]:
    """The data and the four caches at T = 0 (sentence and empty prompt, train and val), made once."""
    from refseg.core.synthetic import generate
    from refseg.study.demo_config import resolve_model
    from refseg.study.demo_processes import extract_in_processes

    out = Path(cfg.out)
    model = resolve_model(cfg.model)
    extractions = {f"{split}{suffix}": dataclasses.replace(cfg.extraction(split, model, prompt),
                                                          sentences=sentences if split == "train" else "all")
                   for split in ("train", "val") for suffix, prompt in (("", "sentence"), ("-no-sentence", "empty"))}
    caches = {k: Path(e.out) for k, e in extractions.items()}
    if (out / "prepared").exists():
        return caches, 0.0
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    generate(out / "data", images=cfg.images, seed=cfg.seed, image_size=cfg.image_size)
    extract_in_processes(list(extractions.values()), cfg.threads)
    (out / "prepared").write_text("")
    return caches, time.perf_counter() - start


def measure(cfg, caches: dict, lever: str, work: Path) -> dict:
    from refseg.heads.sweep import run_sweep
    from refseg.study.demo import cells_of
    from refseg.study.errors import error_split
    from refseg.study.references import every_object_samples, scores

    grid = {**cfg.grid(("film",), text_blind=False), "noise_t": [0], **LEVERS[lever]}
    start = time.perf_counter()
    cells = []
    for blind, suffix in ((False, ""), (True, "-no-sentence")):
        out = work / lever / ("sweep" + suffix)
        rows = run_sweep({**grid, "text_blind": blind}, caches["train" + suffix], caches["val" + suffix], out,
                         data_seed=cfg.seed, progress=False, threads=cfg.threads, processes=cfg.threads)
        cells += cells_of(rows, out / "runs", caches["val" + suffix], blind)
    took = time.perf_counter() - start
    objects = scores(every_object_samples(caches["val"], Path(cfg.out) / "data"))
    errors = error_split(cells, caches["val"], Path(cfg.out) / "data", cfg.device)
    keep = ("head", "text_blind", "n_seeds", "oIoU_mean", "oIoU_std", "mIoU_mean", "mIoU_std", "P@0.5_mean")
    return {"lever": lever, "grid": LEVERS[lever], "cells": [{k: c.get(k) for k in keep} for c in cells],
            "every_object": objects, "errors": errors, "sweep_s": round(took, 1)}


def main(argv=None) -> None:
    from refseg.study.demo_config import DemoConfig

    args = parse_args(argv)
    work = Path(args.work) / (f"images{args.images}-train{args.train_samples}-size{args.image_size}"
                              + ("-first" if args.sentences == "first" else "")
                              + ("" if args.model == "auto" else f"-model-{Path(args.model).name}"))
    cfg = DemoConfig(out=str(work / "demo"), images=args.images, train_samples=args.train_samples,
                     image_size=args.image_size, noise_ts=(0,), seeds=args.seeds, epochs=args.epochs,
                     threads=args.threads, progress=False, device="cpu", model=args.model)
    caches, prepared_s = prepare(cfg, args.sentences)
    for lever in args.lever or ["base"]:
        result = measure(cfg, caches, lever, work)
        result.update(model=args.model, images=args.images, sentences=args.sentences, train_samples=args.train_samples, image_size=args.image_size,
                      seeds=args.seeds, epochs=cfg.epochs if "epochs" not in LEVERS[lever] else LEVERS[lever]["epochs"],
                      prepare_s=round(prepared_s, 1))
        line = json.dumps(result, default=str)
        with open(Path(args.work) / "levers.jsonl", "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


if __name__ == "__main__":
    main()
