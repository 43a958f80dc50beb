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


def dequantize(codes: np.ndarray, scale: np.ndarray, dtype=np.float16) -> np.ndarray:
    """`codes * scale` per channel, computed in float32 and rounded to `dtype`: (..., C, H, W) codes with
    (..., C) scales. Through torch: the same values as numpy's, twice as fast on the reader's hot path
    (its casts are vectorised; numpy's float16 cast is not), which is what a training item pays."""
    import torch  # deferred: torch is heavy, and `refseg-cache` reads stores without it

    values = torch.from_numpy(np.ascontiguousarray(codes)).to(torch.float32)
    values *= torch.from_numpy(np.asarray(scale, np.float32))[..., None, None]
    return values.to(getattr(torch, np.dtype(dtype).name)).numpy()
