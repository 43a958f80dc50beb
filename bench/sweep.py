"""Sweep: K heads in one pass (refseg-sweep) against K solo runs (refseg-train-head), same epochs
(issue 13, "Measure").

    python bench/sweep.py                      # CPU, both cases, sizes below (~5 min on 2 cores)
    python bench/sweep.py --device cuda --quick   # a GPU in < 90 s: prints one JSON line of results

Both sides run refseg's own code on the same stores, heads and settings: the sweep is
`refseg.heads.sweep.run_sweep` over a grid of K seeds, the solo side K calls of
`refseg.heads.train.train`, each into a fresh run directory (set-up, training, validation and the
run files all timed: what a user waits for). The heads' weights are the same bytes on both sides
(tests/test_sweep.py), so the ratio is the price of reading the cache K times.

Cases:
  (a) SD1.5 shapes (512², L=40, every feature and attention map: 4.85 MB per sample) on disk, no
      preload: each run reads every batch from the store. `cold` evicts the stores from the page
      cache (posix_fadvise) before each run, as a cache larger than RAM is read; `warm` leaves them.
      Head: `linear` on s32+s16 (light, as a probe: the regime where reading dominates).
  (b) the demo's shapes (tiny-synth's UNet at 128², L=16) with preload: the demo's head (`vpd`,
      hidden 64, batch 16), its caches read into RAM once per run.
Data are random (bench/read.py's `random_data`), written with refseg's CacheWriter.

`--processes P` (CPU) adds a third side in the same run: the same sweep split over P local processes of
threads/P torch threads each (`run_sweep(processes=P)`, `refseg-sweep --processes`), reported as
"1-proc ÷ P-proc". The heads are then the bytes of one-thread solo runs, not of the threads-thread ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common, models  # noqa: E402
from bench.read import evict, random_data  # noqa: E402

NOISE_T = 5
TINY_SYNTH_UNET = os.path.join(os.path.dirname(_HERE), "backbones", "assets", "tiny-synth", "unet", "config.json")
CASES = {  # name: store shapes, samples, the head and its settings
    "sd15-disk": dict(unet="sd15", image_size=512, token_length=40, train=32, val=8, preload=False,
                      grid={"head": "linear", "tensors": ["s32", "s16"], "batch_size": 8}),
    "demo-preload": dict(unet="tiny-synth", image_size=128, token_length=16, train=600, val=80, preload=True,
                         grid={"head": "vpd", "hidden": 64, "batch_size": 16, "loss": "ce+dice"}),
}
QUICK = {"sd15-disk": dict(train=24, val=8), "demo-preload": dict(train=256, val=32)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=8, help="K: heads in the sweep (seeds 0..K-1) = solo runs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cases", default="sd15-disk,demo-preload")
    p.add_argument("--modes", default="cold,warm", help="sd15-disk: cold (evicted before each run) and/or warm")
    p.add_argument("--quick", action="store_true", help="smaller stores, cold only, one JSON line (GPU: < 90 s)")
    p.add_argument("--dir", default=None, help="where to write the stores (default: the system temp dir)")
    p.add_argument("--processes", type=int, default=1,
                   help="CPU: also time the sweep over P local processes of threads/P threads (a third side)")
    p.add_argument("--train", type=int, default=None,
                   help="training samples of every case (default: the case's; more makes reading dominate)")
    common.add_common_args(p)
    p.set_defaults(repeats=1)
    return p.parse_args(argv)


# ---- stores -------------------------------------------------------------------------------------
def spec_for(case: dict):
    from refseg.core.feature_spec import FeatureSpec

    if case["unet"] == "sd15":
        unet = dict(models.SD15_UNET_CONFIG)
    else:
        with open(TINY_SYNTH_UNET) as f:
            unet = json.load(f)
    return FeatureSpec.from_unet_config(unet, case["image_size"], case["token_length"])


def write_store(path: str, spec, n: int, split: str, first_id: int) -> None:
    """A store of `n` random samples of split `split`, sent_ids from `first_id` (train and val share none)."""
    from refseg.cache.layout import ImageTable, SampleTable
    from refseg.cache.opening import NewStore
    from refseg.cache.writer import CacheWriter, shard_slices

    data = random_data(spec, n, seed=first_id)
    ids = np.arange(first_id, first_id + n)
    samples = SampleTable(sent_id=ids, ref_id=ids, ann_id=ids, image_id=ids, image_row=np.arange(n),
                          text=[f"sentence {i}" for i in ids])
    images = ImageTable(image_id=ids, orig_hw=np.full((n, 2), spec.image_size))
    settings = {"backbone": {"model": "bench-random"}, "extraction": {"image_size": spec.image_size},
                "dataset": {"dataset": "bench", "split": split}}
    with CacheWriter.open(path, NewStore(spec=spec, extraction_record=settings, samples=samples, images=images,
                                         shard_size=16), overwrite=True) as w:
        for s in shard_slices(n, 16):
            w.write_latents(s, data["latent"][s])
            w.write_text(s, data["input_ids"][s], data["attention_mask"][s], data["embedding"][s], data["gt"][s])
        w.add_noise_level(NOISE_T, NOISE_T)
        for s in shard_slices(n, 16):
            w.write_features(NOISE_T, s, {t.name: data[t.name][s] for t in spec.tensors})


# ---- the two sides ------------------------------------------------------------------------------
def grid_for(case: dict, args, device: str) -> dict:
    return dict(case["grid"], noise_t=NOISE_T, seed=list(range(args.heads)), epochs=args.epochs, lr=1e-3,
                optimizer="adam", preload=case["preload"], device=device)


def sweep_side(grid: dict, stores: tuple, out: str, cold: bool, processes: int = 1) -> float:
    from refseg.heads.sweep import run_sweep

    if cold:
        for store in stores:
            evict(store)
    t = time.perf_counter()
    run_sweep(grid, *stores, out, progress=False, processes=processes)
    return time.perf_counter() - t


def solo_side(grid: dict, stores: tuple, out: str, cold: bool) -> float:
    from refseg.heads.train import train

    fixed = {k: v for k, v in grid.items() if k not in ("seed", "head", "noise_t")}
    total = 0.0
    for seed in grid["seed"]:
        if cold:
            for store in stores:
                evict(store)
        t = time.perf_counter()
        train(stores[0], grid["noise_t"], grid["head"], os.path.join(out, f"seed{seed}"), val_cache=stores[1],
              seed=seed, progress=False, **fixed)
        total += time.perf_counter() - t
    return total


def read_only(case: dict, spec, store: str, cold: bool, device: torch.device) -> float:
    """Seconds of one pass of the training batches read and moved to the device, no head: what the
    sweep saves per solo run it replaces (the ratio's ceiling is (read + K heads) / (read / K + K heads))."""
    from refseg.cache import FeatureDataset
    from refseg.heads.batches import batch_to_device, make_loader

    if cold:
        evict(store)
    t = time.perf_counter()
    dataset = FeatureDataset(store, NOISE_T, names=_tensors(case, spec), text=case["grid"]["head"] == "film",
                             preload=case["preload"])
    for batch in make_loader(dataset, case["grid"]["batch_size"], device):
        batch_to_device(batch, device)
    common.sync(device)
    return time.perf_counter() - t


def measure(name: str, case: dict, args, device: str, work: str, mode: str) -> dict:
    """Interleaved repeats (sweep, solo, sweep, solo, ...) of one case; -> the row of its table."""
    spec = spec_for(case)
    stores = (os.path.join(work, f"{name}-train.zarr"), os.path.join(work, f"{name}-val.zarr"))
    if not os.path.exists(stores[0]):
        write_store(stores[0], spec, case["train"], "train", 0)
        write_store(stores[1], spec, case["val"], "val", 1_000_000)
    grid = grid_for(case, args, device)
    # untimed: one 1-head run first, so the first timed side does not pay CUDA's context and kernel
    # loading (on a GPU that alone is seconds, more than a whole quick sweep)
    warm = os.path.join(work, f"{name}-{mode}-warmup")
    solo_side(dict(grid, seed=[0]), stores, warm, False)
    shutil.rmtree(warm, ignore_errors=True)
    sides = [("sweep", sweep_side), ("solo", solo_side)]
    if args.processes > 1:
        sides.append(("processes", lambda *a: sweep_side(*a, processes=args.processes)))
    times = {side: [] for side, _ in sides}
    for r in range(args.repeats):
        for side, fn in sides:
            out = os.path.join(work, f"{name}-{mode}-{side}-{r}")
            times[side].append(fn(grid, stores, out, mode == "cold"))
            shutil.rmtree(out, ignore_errors=True)
    sweep_s, solo_s = common.median(times["sweep"]), common.median(times["solo"])
    split = {}
    if args.processes > 1:
        proc_s = common.median(times["processes"])
        split = {f"{args.processes}-proc sweep s": proc_s, "1-proc ÷ P-proc": sweep_s / proc_s}
    read_s = read_only(case, spec, stores[0], mode == "cold", torch.device(device))
    per_sample = sum(spec[n].nbytes(2) for n in _tensors(case, spec)) / 1e6
    return {"case": name, "mode": mode if not case["preload"] else "preload", "K": args.heads,
            "samples": case["train"], "val": case["val"], "epochs": args.epochs, "MB read/sample": per_sample,
            "head": _describe(case["grid"]), "read-only pass s": read_s, "sweep s": sweep_s,
            "solo s (K runs)": solo_s, "ratio": solo_s / sweep_s, **split}


def _tensors(case: dict, spec) -> list[str]:
    return case["grid"].get("tensors") or [t.name for t in spec.tensors]


def _describe(grid: dict) -> str:
    extra = f" {'+'.join(grid['tensors'])}" if "tensors" in grid else f" hidden {grid.get('hidden')}"
    return f"{grid['head']}{extra}, batch {grid['batch_size']}"


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    info = common.RunInfo(device)
    work = tempfile.mkdtemp(prefix="refseg-bench-sweep-", dir=args.dir)
    columns = ["case", "mode", "K", "samples", "val", "epochs", "MB read/sample", "head", "read-only pass s",
               "sweep s", "solo s (K runs)", "ratio"]
    if args.processes > 1:
        if str(device) != "cpu":
            raise SystemExit("--processes splits a sweep on the CPU (give --device cpu)")
        columns += [f"{args.processes}-proc sweep s", "1-proc ÷ P-proc"]
    table = common.Table(columns)
    try:
        for name in args.cases.split(","):
            case = dict(CASES[name], **(QUICK[name] if args.quick else {}))
            if args.train:
                case["train"] = args.train
            modes = ["preload"] if case["preload"] else (["cold"] if args.quick else args.modes.split(","))
            for mode in modes:
                table.add(**measure(name, case, args, str(device), work, mode))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.quick:
        print(json.dumps({"bench": "sweep", "device": str(device), "gpu": common.gpu_name(device),
                          "rows": table.as_dict()["rows"]}), flush=True)
        return
    notes = ["ratio = solo s / sweep s: K solo refseg-train-head runs against one refseg-sweep of the same K "
             "heads (seeds 0..K-1), set-up, validation and run files included; the weights are the same bytes.",
             "cold: both stores evicted from the page cache before the sweep and before each solo run."]
    common.publish("Sweep: one pass vs solo runs", info, [("", table)], notes, append=not args.no_append,
                   json_out=args.json)


if __name__ == "__main__":
    main()
