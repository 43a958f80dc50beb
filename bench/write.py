"""The store's write path against the raw-write floor (issue 28, item 4).

    python bench/write.py                          # SD1.5 shapes at 512², L=40; 96 samples per run; disk and tmpfs
    python bench/write.py --samples 192 --shard-sizes 16,8 --engines tensorstore,zarr-python,zarrs

What one run measures, with the variants interleaved and repeated (medians reported):
  - the real extraction pipeline's stage 2 (`Extraction.features` -> `ShardBuffer` -> the writer thread
    -> `CacheWriter.write_features` -> the engine), with a stand-in denoiser that returns SD1.5-shaped
    float16 features and their device stats at once, so all that is timed is host work and the store;
  - per engine (tensorstore: the default; zarr-python: what wrote stores before; zarrs: zarr-python
    with the zarrs Rust codec pipeline, `pip install zarrs`, measured for the choice in DESIGN §6) and
    shard size, on the disk (--dir) and in RAM (/dev/shm);
  - the floor: the same bytes written with `f.write`, one file per tensor per shard, in the same place.
Reported: host samples/s, GB/s into the store, and the ratio to the floor of the same run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import types

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common  # noqa: E402
from bench.read import random_data, spec_for  # noqa: E402
from refseg.cache.layout import ImageTable, SampleTable  # noqa: E402
from refseg.cache.opening import NewStore  # noqa: E402
from refseg.cache.writer import CacheWriter  # noqa: E402
from refseg.core.noise import noise_input  # noqa: E402
from refseg.extract.checks import feature_stats  # noqa: E402
from refseg.extract.pipeline import Extraction  # noqa: E402
from refseg.extract.stages import NoiseLevel  # noqa: E402

NOISE_T = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96, help="samples per run (SD1.5: ~4.85 MB each)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--token-length", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-sizes", default="16,8")
    p.add_argument("--engines", default="tensorstore,zarr-python,zarrs",
                   help="zarrs is left out when the package is not installed")
    p.add_argument("--dir", default=None, help="the disk to write on (default: the system temp dir)")
    p.add_argument("--no-tmpfs", action="store_true", help="leave out the runs in RAM (/dev/shm)")
    common.add_common_args(p)
    p.set_defaults(repeats=3)
    return p.parse_args(argv)


def tables(n: int) -> tuple[SampleTable, ImageTable]:
    images = ImageTable(image_id=np.arange(n), orig_hw=np.full((n, 2), 480))
    samples = SampleTable(sent_id=np.arange(n), ref_id=np.arange(n), ann_id=np.arange(n), image_id=np.arange(n),
                          image_row=np.arange(n), text=["x"] * n)
    return samples, images


class StandIn:
    """What `Extraction.features` needs of a backbone, with a denoiser that costs nothing: each batch's
    features are slices of tensors made once."""

    device = torch.device("cpu")

    def __init__(self, spec, batch_size: int):
        data = random_data(spec, batch_size)
        self.features = {t.name: torch.from_numpy(data[t.name]) for t in spec.tensors}
        # the finite/peak stats are device work on a GPU: made once here, not timed as host work
        self.stats = feature_stats(self.features, [t.name for t in spec.tensors])

    def capture(self, spec):
        import contextlib

        return contextlib.nullcontext()

    def unet(self, stage, capture, copies, batch, names):
        out = {name: self.features[name][:len(batch)] for name in names}
        return {**out, **{key: value[:len(batch)] for key, value in self.stats.items()}}


def store_run(path: str, spec, n: int, shard_size: int, engine: str, batch_size: int) -> float:
    """Seconds for the pipeline's stage 2 to fill one noise level of a new store at `path`."""
    shutil.rmtree(path, ignore_errors=True)
    if engine == "zarrs":  # zarr-python's own writes, through the Rust codec pipeline
        import zarr

        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            return store_run(path, spec, n, shard_size, "zarr-python", batch_size)
    samples, images = tables(n)
    writer = CacheWriter.open(path, NewStore(spec=spec,
                                             extraction_record={"backbone": {}, "extraction": {}, "dataset": {}},
                                             samples=samples, images=images, shard_size=shard_size),
                              engine=engine)
    writer.add_noise_level(NOISE_T, timestep=NOISE_T)
    stand_in = StandIn(spec, batch_size)
    cfg = types.SimpleNamespace(batch_size=batch_size, progress=False, prompt="sentence", shard=(0, 1))
    run = Extraction(cfg, stand_in, spec, writer, refer=None, tables=types.SimpleNamespace(samples=samples),
                     report=types.SimpleNamespace(rows_computed={}))
    run._unet = stand_in.unet
    stage = NoiseLevel(noise_input(t=NOISE_T))
    start = time.perf_counter()
    run.run_stage(stage, functools.partial(run.features, stage))
    seconds = time.perf_counter() - start
    assert writer.done(NOISE_T).all()
    writer.close()
    return seconds


def floor_run(folder: str, spec, n: int, shard_size: int) -> float:
    """Seconds to write the same bytes with f.write: one file per tensor per shard."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    data = random_data(spec, shard_size)
    start = time.perf_counter()
    for shard, first in enumerate(range(0, n, shard_size)):
        rows = min(shard_size, n - first)
        for t in spec.tensors:
            with open(os.path.join(folder, f"{t.name}.{shard}"), "wb") as f:
                f.write(data[t.name][:rows].tobytes())
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    info = common.RunInfo(torch.device("cpu"))
    spec = spec_for(args.image_size, args.token_length)
    n = args.samples
    nbytes = n * sum(int(np.prod(t.shape)) * 2 for t in spec.tensors)
    places = [("disk", tempfile.mkdtemp(prefix="refseg-write-", dir=args.dir))]
    if not args.no_tmpfs and os.path.isdir("/dev/shm"):
        places.append(("tmpfs", tempfile.mkdtemp(prefix="refseg-write-", dir="/dev/shm")))
    engines = [e for e in args.engines.split(",") if e != "zarrs" or importlib.util.find_spec("zarrs")]
    shard_sizes = common.int_list(args.shard_sizes)
    times: dict[tuple, list[float]] = {}
    try:
        for _ in range(args.repeats):  # interleaved: every variant once per repeat
            for place, folder in places:
                for shard_size in shard_sizes:
                    key = (place, shard_size, "floor (f.write)")
                    times.setdefault(key, []).append(floor_run(os.path.join(folder, "floor"), spec, n, shard_size))
                    for engine in engines:
                        path = os.path.join(folder, "c.zarr")
                        times.setdefault((place, shard_size, engine), []).append(
                            store_run(path, spec, n, shard_size, engine, args.batch_size))
    finally:
        for _, folder in places:
            shutil.rmtree(folder, ignore_errors=True)

    table = common.Table(["where", "shard size", "writer", "samples/s", "GB/s", "of the floor", "spread"])
    for (place, shard_size, writer), seconds in times.items():
        median = common.median(seconds)
        floor = common.median(times[(place, shard_size, "floor (f.write)")])
        table.add(**{"where": place, "shard size": shard_size, "writer": writer, "samples/s": n / median,
                     "GB/s": nbytes / median / 1e9, "of the floor": f"{floor / median:.2f}x",
                     "spread": common.spread(seconds)})
    notes = [f"{n} samples of {nbytes / n / 1e6:.2f} MB (the spec's features and maps, float16), batch "
             f"{args.batch_size}; stage 2 of the real pipeline (ShardBuffer, writer thread, write_features) with a "
             "stand-in denoiser; checksums on (format 2: a CRC-32C per chunk)",
             f"{args.repeats} repeats, every variant once per repeat (interleaved); medians; 'of the floor' = "
             "f.write time of the same bytes in the same place / this writer's time"]
    common.publish(f"Store write path: SD1.5 shapes at {args.image_size}², L={args.token_length}", info,
                   [("Host samples/s and GB/s into the store", table)], notes, append=not args.no_append,
                   json_out=args.json)


if __name__ == "__main__":
    main()
