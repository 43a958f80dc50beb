"""Bytes of a GT mask as a format-3 store keeps it (zstd level 1, a frame per row), and what decoding costs.

    python bench/mask_bytes.py                 # 512² masks: the synthetic set's and random polygons

Measures the compression ratio that `cache/usage.py` plans with (MASKS_RATIO, 32) and the time
`cache/fastread.py` spends decoding a mask row against copying the raw row (a ratio, same run).
No COCO masks here (no datasets on this machine): polygons with 30 vertices stand in for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from numcodecs import Zstd
from PIL import Image, ImageDraw

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common  # noqa: E402
from refseg.core.refer import ReferDataset  # noqa: E402
from refseg.core.synthetic import generate  # noqa: E402
from refseg.core.transforms import mask_to_size  # noqa: E402


def synthetic_masks(size: int, images: int) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, images=images, seed=0)
        refer = ReferDataset(str(root.parent), root.name, "unc")
        refs = [r for split in refer.available_splits() for r in refer.refs(split)]
        return [mask_to_size(refer.mask(r["ref_id"]), size) for r in refs]


def polygon_masks(size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = Image.new("L", (size, size), 0)
        cx, cy = rng.integers(size // 10, size - size // 10, 2)
        r = rng.integers(size // 50, size // 2.5)
        angles = np.linspace(0, 2 * np.pi, 30, endpoint=False)
        ImageDraw.Draw(image).polygon([(cx + r * np.cos(a) * rng.uniform(.6, 1.2), cy + r * np.sin(a) * rng.uniform(.6, 1.2))
                                       for a in angles], fill=1)
        out.append(np.asarray(image, dtype=np.uint8))
    return out


def measure(masks: list[np.ndarray], repeats: int) -> dict:
    codec = Zstd(level=1)  # what cache/layout.py's MASKS_CODEC writes
    frames = [codec.encode(m.tobytes()) for m in masks]
    raw = masks[0].nbytes
    out = np.empty(raw, dtype=np.uint8)
    decode, copy = [], []
    for _ in range(repeats):  # interleaved: decode, then copy, per repeat
        t = time.perf_counter()
        for f in frames:
            codec.decode(f, out=out)
        decode.append((time.perf_counter() - t) / len(frames))
        t = time.perf_counter()
        for m in masks:
            out[:] = m.reshape(-1)
        copy.append((time.perf_counter() - t) / len(masks))
    sizes = np.array([len(f) for f in frames])
    return {"masks": len(masks), "mean": sizes.mean(), "max": sizes.max(), "ratio": raw / sizes.mean(),
            "worst": raw / sizes.max(), "decode_us": common.median(decode) * 1e6, "copy_us": common.median(copy) * 1e6}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{common.cpu_model()}, {os.cpu_count()} cores, load {common.load_average()}")
    print(f"| masks ({args.size}²) | n | mean bytes | largest | ratio (mean) | ratio (largest) | decode µs | copy µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, masks in (("synthetic set", synthetic_masks(args.size, args.images)),
                        ("polygons, 30 vertices", polygon_masks(args.size, 200))):
        r = measure(masks, args.repeats)
        print(f"| {name} | {r['masks']} | {r['mean']:,.0f} | {r['max']:,} | {r['ratio']:.0f}× | {r['worst']:.0f}× | "
              f"{r['decode_us']:.0f} | {r['copy_us']:.0f} |")


if __name__ == "__main__":
    main()
