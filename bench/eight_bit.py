"""int8 against fp8 (float8_e4m3fn) for 8-bit feature storage, on a store's own float16 features.

    python bench/eight_bit.py demo-out/cache/val.zarr --noise-t 0      # after `make demo`

Both keep one float32 scale per sample and channel beside one byte per value, so a store has the same
bytes either way; what differs is the error. int8 (cache/quantize.py, what `--cache-dtype int8`
stores): `scale = max|x| / 127`, codes rounded, an absolute error of at most scale/2 on every value.
fp8: `scale = max|x| / 448` (e4m3's largest finite value), codes cast to float8_e4m3fn, a relative
error of at most 2^-4 on each value (3 mantissa bits) and finer steps near zero. Reported per tensor:
the error's RMS over the values' RMS, and the 99.9th percentile of |error| over the channel's peak.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
from bench import common  # noqa: E402
from refseg.cache import open_cache  # noqa: E402
from refseg.cache.quantize import dequantize, quantize  # noqa: E402

E4M3_MAX = 448.0


def int8_round_trip(x: np.ndarray) -> np.ndarray:
    codes, scale = quantize(x)
    return dequantize(codes, scale, np.float32)


def fp8_round_trip(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.asarray(x, np.float32))
    peak = t.abs().flatten(2).amax(dim=2)
    scale = torch.where(peak > 0, peak / E4M3_MAX, torch.ones_like(peak))[..., None, None]
    return ((t / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale).numpy()


def errors(x: np.ndarray, back: np.ndarray) -> tuple[float, float]:
    x = x.astype(np.float32)
    err = back - x
    rel_rms = float(np.sqrt((err**2).mean()) / max(np.sqrt((x**2).mean()), 1e-30))
    peak = np.abs(x).reshape(*x.shape[:2], -1).max(axis=2)[..., None, None]
    rel_peak = np.abs(err) / np.where(peak > 0, peak, 1)
    return rel_rms, float(np.quantile(rel_peak, 0.999))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("--noise-t", type=int, default=0)
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args(argv)
    cache = open_cache(args.cache)
    rows = np.flatnonzero(cache.done(args.noise_t))[:args.samples]
    print(f"{common.cpu_model()}, torch {torch.__version__}; {args.cache} T={args.noise_t}, {len(rows)} samples")
    print("| tensor | shape | int8 RMS error / RMS | fp8 RMS error / RMS | int8 p99.9 error / peak | fp8 p99.9 error / peak |")
    print("|---|---|---:|---:|---:|---:|")
    for name in cache.spec.names:
        x = np.stack([cache.read(args.noise_t, int(r), [name])[name] for r in rows]).astype(np.float32)
        (i_rms, i_peak), (f_rms, f_peak) = errors(x, int8_round_trip(x)), errors(x, fp8_round_trip(x))
        print(f"| {name} | {tuple(x.shape[1:])} | {i_rms:.2e} | {f_rms:.2e} | {i_peak:.2e} | {f_peak:.2e} |")


if __name__ == "__main__":
    main()
