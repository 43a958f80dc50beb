"""The demo's study past the 10-minute CPU budget: more images, more training sentences, more epochs,
a larger val set (issue 13: is the best cell far above its baseline once data and epochs are
not what limits it? Its first run, on an H100 (BENCHMARKS.md), predates the no-sentence baseline).

    python bench/demo_scale.py --device cuda              # the GPU check's step g (a few minutes)
    python bench/demo_scale.py --device cpu --tiny        # the same code at toy size (tests/test_gpu_check.py)

It runs `refseg-report demo` itself (`study.demo.run_demo`) with the settings below, `film` only (the
demo's best head) and its no-sentence baseline, and prints one JSON line: every cell's mean ± std over
the seeds, the every-pixel and every-object references (the best cell and its no-sentence baseline
against every object on oIoU and mIoU), the error split per cell (study/errors.py), the computed
conclusions, the spreads and the wall time of each stage. Nothing else differs from `make demo`: the same tiny-synth backbone, data
generator, noise levels, loss, optimizer and rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCALES = {
    # 4000 images: 2800 train images (~10,000 sentences, the first 3000 used; the demo trains on 2,370 from
    # 420 images), 400 val images (~2,200 sentences, 6.6x the demo's 335: the seeds' spread should then
    # dominate the sampling)
    "gpu": dict(images=4000, train_samples=3000, epochs=10, seeds=3, batch_size=32, hidden=32),
    "tiny": dict(images=24, train_samples=40, epochs=1, seeds=2, batch_size=8, hidden=8, image_size=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the rehearsal a test runs)")
    p.add_argument("--out", default=None, help="the study's folder (default: a temporary one, removed)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-samples", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    import torch

    from refseg.study.demo import run_demo
    from refseg.study.demo_config import DemoConfig

    args = parse_args(argv)
    scale = dict(SCALES["tiny" if args.tiny else "gpu"])
    for key in ("epochs", "train_samples"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    with tempfile.TemporaryDirectory(prefix="refseg-demo-scale-") as scratch:
        out = args.out or str(Path(scratch) / "demo")
        cfg = DemoConfig(out=out, model="tiny" if args.tiny else "auto", heads=("film",), device=args.device,
                         threads=1 if args.tiny else 2, progress=False, **scale)
        start = time.perf_counter()
        result = run_demo(cfg)
        study = result["study"]
        keep = ("head", "noise_t", "text_blind", "n_seeds", "oIoU_mean", "oIoU_std", "mIoU_mean", "mIoU_std",
                "P@0.5_mean", "P@0.5_std")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              (args.device if args.device != "auto" else "cpu"))
        print(json.dumps({
            "bench": "demo_scale", "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "settings": {**scale, "heads": list(cfg.heads), "noise_ts": list(cfg.noise_ts), "model": result["model"]},
            "cells": [{k: c.get(k) for k in keep} for c in result["cells"]],
            "chance": study["chance"], "every_object": study["every_object"],
            "against_every_object": study["against_every_object"], "errors": study["errors"],
            "seed_std": study["seed_std"], "sampling_std": study["sampling_std"], "conclusions": study["lines"],
            "by_kind": study["by_kind"],
            "timings_s": cfg.timings, "wall_s": round(time.perf_counter() - start, 1)}, default=str), flush=True)


if __name__ == "__main__":
    main()
