"""Referring-segmentation metrics (docs/DESIGN.md §8): P@X, oIoU, mIoU over sentences, in percent.

Per sentence: I = |pred ∧ gt|, U = |pred ∨ gt|, IoU = I/U (0 when U = 0, as LAVT/VPD count it).
mIoU = mean IoU; oIoU = ΣI / ΣU; P@X = share of sentences with IoU ≥ X.

The arithmetic is LAVT's evaluation loop, operation for operation (VPD copies it), so that every
number is the same float and prints with the same last digit under '%.2f':
P@X = hits * 100. / total, not 100 * mean(iou >= X): that float differs in its last bit for about
a quarter of the (hits, total) pairs, and sometimes in the printed digit (23 of 160: 14.375
exactly, '14.38', against 100 * 0.14375 = 14.374999..., '14.37'). oIoU = cum_I * 100. / cum_U;
mIoU = np.mean(ious) * 100.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
TABLE_COLUMNS = ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")


def _threshold_key(x: float) -> str:
    return f"P@{x:g}"


class RefSegMetrics:
    """Accumulates per-sentence intersections and unions; `summary()` reports them in percent."""

    def __init__(self, thresholds=DEFAULT_THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.ious: list[float] = []

    def __len__(self) -> int:
        return len(self.ious)

    def add(self, intersection: int, union: int) -> float:
        """Record one sentence from its pixel counts; returns its IoU."""
        intersection, union = int(intersection), int(union)
        if intersection < 0 or union < intersection:
            raise ValueError(f"need 0 <= intersection <= union, got I={intersection}, U={union}")
        iou = intersection / union if union > 0 else 0.0
        self.intersections.append(intersection)
        self.unions.append(union)
        self.ious.append(iou)
        return iou

    def update(self, pred, gt) -> float:
        """Record one sentence from bool masks of the same shape; returns its IoU."""
        pred = _as_bool(pred)
        gt = _as_bool(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        return self.add(np.count_nonzero(pred & gt), np.count_nonzero(pred | gt))

    def merge(self, other: "RefSegMetrics") -> "RefSegMetrics":
        """Add another accumulator's sentences (e.g. from another process) to this one."""
        self.intersections += other.intersections
        self.unions += other.unions
        self.ious += other.ious
        return self

    def summary(self) -> dict:
        """{"P@0.5", ..., "P@0.9", "oIoU", "mIoU"} in percent, plus "n" (sentences); zeros when empty."""
        n = len(self.ious)
        ious = np.asarray(self.ious, dtype=np.float64)
        out = {}
        for t in self.thresholds:
            hits = int(np.count_nonzero(ious >= t))  # >= as LAVT
            out[_threshold_key(t)] = hits * 100.0 / n if n else 0.0  # LAVT: seg_correct * 100. / seg_total
        total_u = sum(self.unions)
        out["oIoU"] = sum(self.intersections) * 100.0 / total_u if total_u else 0.0  # LAVT: cum_I * 100. / cum_U
        out["mIoU"] = float(np.mean(ious) * 100.0) if n else 0.0  # LAVT: np.mean(mean_IoU) * 100.
        out["n"] = n
        return out


def _as_bool(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x if x.dtype == bool else x != 0


def format_table(rows, first_col: str = "Noise") -> str:
    """Markdown table of summaries: ``first_col | P@0.5 | ... | P@0.9 | oIoU | mIoU``, 2 decimals.

    `rows` is a list of (label, summary dict); a column missing from a summary prints as ``-``.
    """
    header = [first_col, *TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(TABLE_COLUMNS)) + "|"]
    for label, summary in rows:
        cells = [str(label)]
        for col in TABLE_COLUMNS:
            value = summary.get(col)
            cells.append("-" if value is None else f"{float(value):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
