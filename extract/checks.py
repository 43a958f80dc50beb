"""Refusing what the cache cannot hold: NaN/inf, and features beyond float16's range (when it stores float16).

Each check raises `NonFiniteError` naming the sample; `run_extraction` adds the one piece of advice
(`advice`) to whichever of them stops a run, so the advice is written here once.
"""

from __future__ import annotations

import numpy as np
import torch

from refseg.cache.layout import SampleTable
from refseg.core.errors import NonFiniteError

FLOAT16_MAX = 65504.0  # the cache stores float16: anything larger becomes inf


class Float16Overflow(NonFiniteError):
    """Finite features too large for the cache's float16."""


def advice(exc: NonFiniteError, compute_dtype: torch.dtype) -> str:
    """What to do about `exc`, to append to its message."""
    if compute_dtype == torch.float16:
        return " (float16 overflow in the backbone: rerun with --dtype bf16)"
    if isinstance(exc, Float16Overflow):
        return (" (the cache stores float16 whatever --dtype is: this backbone's activations do not fit; "
                "check the model weights, or store float32 with --cache-dtype fp32)")
    return ""


def feature_stats(captured: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Per sample and tensor `names[k]`, on the device (no sync): finite? and the largest magnitude.
    (B, len(names)) each, for `check_features`."""
    return {"finite": torch.stack([captured[n].flatten(1).isfinite().all(1) for n in names], 1),
            "peak": torch.stack([captured[n].flatten(1).abs().amax(1).float() for n in names], 1)}


def check_features(names: list[str], stats: dict[str, np.ndarray], rows, t: int, samples_table: SampleTable,
                   skip: set, limit: float = FLOAT16_MAX) -> None:
    """Refuse features that are NaN/inf, or larger than `limit`, the largest value the store's type holds
    (float16's by default; rows in `skip` are not looked at).

    `stats` is `feature_stats` of the features in the compute dtype, taken before the float16
    conversion that would turn an overflow into inf, so the message can tell a backbone that
    overflows (fp16 compute) from values the cache cannot hold.
    """
    finite, peak = stats["finite"], stats["peak"]
    for j, row in enumerate(rows):
        row = int(row)
        if row in skip:
            continue
        sid = int(samples_table.sent_id[row])
        bad = [n for k, n in enumerate(names) if not finite[j, k]]
        if bad:
            raise NonFiniteError(f"non-finite features (NaN/inf) for sent_id {sid} at T={t} in {', '.join(bad)}; "
                                 "nothing of its shard was stored")
        big = [(n, float(peak[j, k])) for k, n in enumerate(names) if peak[j, k] > limit]
        if big:
            name, value = max(big, key=lambda nv: nv[1])
            raise Float16Overflow(f"features of sent_id {sid} at T={t} overflow float16, the cache's storage type "
                                  f"({name} reaches {value:.3g} > 65504); nothing of its shard was stored")
