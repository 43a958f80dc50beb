"""8-bit feature storage (`refseg-extract --cache-dtype int8`): per-sample, per-channel scales.

Each feature or attention tensor of a sample (C, H, W) is stored as int8 codes and one float32 scale
per channel, `scale[c] = max |x[c]| / 127`, `code = round(x / scale)`: symmetric, so zero stays
exactly zero, and each channel keeps its own range (the UNet's channels differ by orders of
magnitude). Readers get `code * scale` back in float16, so heads do not change. The error of a value
is at most half a step, `scale[c] / 2`; a channel that is all zeros has scale 0 and reads as zeros.
What it costs the study and VPD's masks is measured in BENCHMARKS.md ("8-bit features").
"""

from __future__ import annotations

import numpy as np

QMAX = 127
SCALE_SUFFIX = "_scale"  # tensor "s8" is stored as "s8" (int8) and "s8_scale" (float32, (N, C))


def scale_name(name: str) -> str:
    return f"{name}{SCALE_SUFFIX}"


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 (n, C, H, W), scales float32 (n, C)) of float features `x` (n, C, H, W)."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).reshape(*x.shape[:2], -1).max(axis=2) if x.size else np.zeros(x.shape[:2], np.float32)
    scale = (peak / QMAX).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[..., None, None]
    codes = np.clip(np.rint(x / safe), -QMAX, QMAX).astype(np.int8)
    return codes, scale


# Values per block of the dequantisation: its float32 scratch (1 MiB) stays in the CPU's cache, where
# converting a whole batch at once streams a float32 copy 4x the codes' size through memory (5x slower)
DEQUANTIZE_BLOCK = 1 << 18


def dequantize(codes: np.ndarray, scale: np.ndarray, dtype=np.float16, out: np.ndarray | None = None) -> np.ndarray:
    """`codes * scale` per channel, computed in float32 and rounded to `dtype`: (..., C, H, W) codes with
    (..., C) scales. Through torch (its casts are vectorised; numpy's float16 cast is not), a block of
    channels at a time (DEQUANTIZE_BLOCK): the same values as one whole-array product, what a training
    item pays on the reader's hot path (bench/read.py, int8 rows)."""
    import torch  # deferred: torch is heavy, and `refseg-cache` reads stores without it

    codes = np.ascontiguousarray(codes)
    plane = int(np.prod(codes.shape[-2:]))
    channels = torch.from_numpy(codes).reshape(-1, plane)  # one row per (sample, channel)
    scales = torch.from_numpy(np.ascontiguousarray(scale, np.float32)).reshape(-1, 1)
    if out is None:
        out = np.empty(codes.shape, dtype=dtype)
    values = torch.from_numpy(out).view(channels.shape)  # C-contiguous `out` of codes' shape, dtype `dtype`
    rows = max(1, DEQUANTIZE_BLOCK // max(1, plane))
    scratch = torch.empty((min(rows, channels.shape[0]), plane), dtype=torch.float32)
    for start in range(0, channels.shape[0], rows):
        part = scratch[:min(rows, channels.shape[0] - start)]
        part.copy_(channels[start:start + rows])
        part.mul_(scales[start:start + rows])
        values[start:start + rows].copy_(part)
    return out
