"""The rule that turns the demo's table into conclusions: intervals over seeds, the verdict on a pair of
cells, and the bootstrap over val sentences that gives a run's (or a paired difference's) sampling std.

Why seeds and a computed verdict: single runs rank T = 0 and T = 5 differently from one machine to the
next (issue 13). A difference is called only where the seeds' intervals separate (`verdict`), so the
conclusions, not the digits, are what another machine or thread count reproduces.
"""

from __future__ import annotations

import math

import numpy as np

Z = 2.0  # intervals are mean ± Z·std/√n: two standard errors
BOOTSTRAP_DRAWS = 1000


def interval(cell: dict, metric: str = "oIoU") -> tuple[float, float]:
    """mean ± Z·std/√n over the cell's seeds (no width with one seed: nothing can then be called)."""
    mean, std, n = float(cell[f"{metric}_mean"]), float(cell[f"{metric}_std"]), int(cell["n_seeds"])
    if n < 2 or not math.isfinite(std):
        return (-math.inf, math.inf)
    half = Z * std / math.sqrt(n)
    return (mean - half, mean + half)


def verdict(a: dict, b: dict, name_a: str, name_b: str, metric: str = "oIoU", sampling: float = 0.0) -> str:
    """'A beats B' only where the difference of the means exceeds Z standard errors, otherwise 'no clear
    difference'. The standard error adds the seeds' spread of each (std²/n) and `sampling`, the val
    sampling std of the difference (a paired bootstrap over the val sentences). With `sampling` 0 this
    is the intervals mean ± Z·std/√n, combined in quadrature; with one seed nothing is called."""
    ma, mb = float(a[f"{metric}_mean"]), float(b[f"{metric}_mean"])
    se2 = sampling ** 2
    for cell in (a, b):
        std, n = float(cell[f"{metric}_std"]), int(cell["n_seeds"])
        se2 = se2 + (std ** 2 / n if n > 1 and math.isfinite(std) else math.inf)
    if abs(ma - mb) > Z * math.sqrt(se2):
        winner, loser = ((name_a, ma), (name_b, mb)) if ma > mb else ((name_b, mb), (name_a, ma))
        return f"{winner[0]} beats {loser[0]} ({winner[1]:.1f} vs {loser[1]:.1f})"
    return f"{name_a} vs {name_b}: no clear difference ({ma:.1f} vs {mb:.1f})"


def _oiou_draws(i: np.ndarray, u: np.ndarray, picks: np.ndarray) -> np.ndarray:
    return 100 * i[picks].sum(1) / np.maximum(u[picks].sum(1), 1)


def _picks(n: int, draws: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_std(intersections, unions, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """The sampling std of oIoU (%) of one run: resample the val sentences with replacement, recompute."""
    i, u = np.asarray(intersections, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    return float(_oiou_draws(i, u, _picks(len(i), draws, seed)).std(ddof=1))


def paired_bootstrap_std(a: dict, b: dict, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """The sampling std of the oIoU difference of two runs scored on the same val sentences: both are
    resampled with the same draws, so what the two share (easy and hard sentences) cancels.
    `a`, `b`: {sent_id: (i, u)}; only the sentences both hold count."""
    ids = sorted(set(a) & set(b))
    ia, ua = (np.array([a[k][j] for k in ids], dtype=np.float64) for j in (0, 1))
    ib, ub = (np.array([b[k][j] for k in ids], dtype=np.float64) for j in (0, 1))
    picks = _picks(len(ids), draws, seed)
    return float((_oiou_draws(ia, ua, picks) - _oiou_draws(ib, ub, picks)).std(ddof=1))

