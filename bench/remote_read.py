"""Reading a store on S3 against the same store on the local disk (issue 24, item 4), in one run.

    python bench/remote_read.py                       # SD1.5 shapes at 256², 32 samples; moto on 127.0.0.1

The S3 server is moto's (started here, on 127.0.0.1): its latency is a local process's, not a cloud
region's, so the ratios say what refseg's read path costs over S3's protocol, not what a remote
bucket will give. Variants, interleaved and repeated (medians):
  - local: `FeatureDataset` over the local store (one item at a time, direct shard reads);
  - s3, FeatureDataset: the same items from the s3:// copy (zarr-python, one request per tensor);
  - s3, concurrent: every tensor of every sample requested at once through zarr's async API
    (`asyncio.gather` over `AsyncArray.getitem`), what a prefetching reader could reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common  # noqa: E402
from bench.read import NOISE_T, random_data, spec_for, write_store  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--token-length", type=int, default=40)
    common.add_common_args(p)
    p.set_defaults(repeats=3)
    return p.parse_args(argv)


def read_all(dataset) -> int:
    n = 0
    for i in range(len(dataset)):
        item = dataset[i]
        n += sum(t.numel() * t.element_size() for t in item["features"].values())
    return n


def read_concurrently(url: str, names: list[str], rows: int) -> int:
    import zarr

    async def main():
        group = await zarr.api.asynchronous.open_group(url, mode="r")
        arrays = [await group.getitem(f"t{NOISE_T:04d}/{name}") for name in names]
        parts = await asyncio.gather(*(a.getitem((r,)) for a in arrays for r in range(rows)))
        return sum(p.nbytes for p in parts)

    from zarr.core.sync import sync

    return sync(main())  # on zarr's own event loop, which its S3 file system is bound to


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    info = common.RunInfo(torch.device("cpu"))
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from refseg.cache import FeatureDataset

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    work = tempfile.mkdtemp(prefix="refseg-remote-")
    try:
        spec = spec_for(args.image_size, args.token_length)
        local = os.path.join(work, "c.zarr")
        write_store(local, spec, random_data(spec, args.samples), "none", 16)
        boto3.client("s3").create_bucket(Bucket="bench")
        s3fs.S3FileSystem().put(local, "bench/c.zarr", recursive=True)
        url = "s3://bench/c.zarr"
        variants = {
            "local disk, FeatureDataset": lambda: read_all(FeatureDataset(local, NOISE_T, text=False)),
            "s3 (moto, 127.0.0.1), FeatureDataset": lambda: read_all(FeatureDataset(url, NOISE_T, text=False)),
            "s3 (moto, 127.0.0.1), all requests at once (zarr async)":
                lambda: read_concurrently(url, list(spec.names), args.samples),
        }
        times = {name: [] for name in variants}
        nbytes = {}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                nbytes[name] = fn()
                times[name].append(time.perf_counter() - start)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = common.median(times["local disk, FeatureDataset"])
    table = common.Table(["read", "samples/s", "MB/s", "vs local", "spread"])
    for name, seconds in times.items():
        median = common.median(seconds)
        table.add(**{"read": name, "samples/s": args.samples / median, "MB/s": nbytes[name] / median / 1e6,
                     "vs local": f"{base / median:.3f}x", "spread": common.spread(seconds)})
    notes = [f"{args.samples} samples, every feature and map of each ({spec.bytes_per_sample() / 1e6:.2f} MB), SD1.5 "
             f"shapes at {args.image_size}², codec none, shard 16; moto's S3 server in this process's machine",
             f"{args.repeats} repeats interleaved, medians; the local store is read warm (page cache)"]
    common.publish(f"Reading a store on S3 against the local disk: SD1.5 shapes at {args.image_size}²", info,
                   [("Reads", table)], notes, append=not args.no_append, json_out=args.json)


if __name__ == "__main__":
    main()
