"""Scoring heads on a cache: one pass over a dataset scores any number of heads, each batch read and
moved to the device once. Training's per-epoch validation, `refseg-eval` (`evaluate`, `predict`),
the sweep (through training) and `refseg-compare` all score with `score_samples`, so a run's numbers
are one computation wherever they are printed.

Protocol `vpd` (LAVT/VPD, default): logits upsampled bilinearly (align_corners=True) to S x S,
foreground only where logit1 > logit0 (ties -> background), compared with the cache's GT masks
(already at S x S, nearest). Protocol `original` (`original_gt`): logits resized to the image's
original H x W the same way, compared with the union of the ref's polygons at full resolution.
Each sentence is recorded in a `refseg.core.metrics.RefSegMetrics` per head (DESIGN.md §8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from refseg.core.metrics import RefSegMetrics
from refseg.heads.batches import autocast, batch_to_device, make_loader
from refseg.heads.losses import upsample_logits
from refseg.heads.settings import EVAL_BATCH_SIZE


def logits_to_mask(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, 2, h, w) logits -> (B, H, W) bool: bilinear (align_corners=True), then fg where logit1 > logit0."""
    logits = upsample_logits(logits, size)
    return logits[:, 1] > logits[:, 0]


@dataclass(frozen=True)
class SampleScore:
    """One sentence scored for one head: its masks and what its RefSegMetrics recorded for it."""

    row: int  # the sample's row in the cache
    pred: np.ndarray  # bool, the target's shape
    target: np.ndarray  # bool
    iou: float
    intersection: int
    union: int


@torch.no_grad()
def score_samples(models: list, dataset, metrics: list[RefSegMetrics], *, device, batch_size: int = EVAL_BATCH_SIZE,
                  workers: int = 0, head_dtype: str = "auto", progress: bool = False,
                  original_gt: Callable[[int], np.ndarray] | None = None) -> Iterator[list[SampleScore]]:
    """Per sample of `dataset`, in order: one SampleScore per model, each recorded in `metrics[k]` first.

    The models run in eval mode (restored after); `dataset` holds every tensor any of them reads.
    `original_gt(row)`: protocol `original`'s target at the image's size (protocol `vpd` without it).
    """
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for batch in _maybe_progress(make_loader(dataset, batch_size, device, workers=workers), len(dataset), progress):
            features, text, text_mask = batch_to_device(batch, device)
            rows, gt = batch["row"].tolist(), batch["gt"]
            targets = [original_gt(row) for row in rows] if original_gt is not None else gt.numpy() != 0
            predictions = []
            for model in models:
                with autocast(device, head_dtype):
                    logits = model(features, text, text_mask)
                predictions.append(_masks(logits.float(), gt.shape[-2:], targets, original_gt is not None))
            for k, row in enumerate(rows):
                yield [_record(scores, row, preds[k], targets[k]) for scores, preds in zip(metrics, predictions)]
    finally:
        for model, training in zip(models, modes):
            model.train(training)


def score(models: list, dataset, **options) -> list[RefSegMetrics]:
    """`score_samples` run to the end -> one RefSegMetrics per model (`.summary()`: P@X, oIoU, mIoU)."""
    metrics = [RefSegMetrics() for _ in models]
    for _ in score_samples(models, dataset, metrics, **options):
        pass
    return metrics


def _masks(logits: torch.Tensor, cached_size, targets, original: bool) -> list[np.ndarray]:
    """A batch's predicted masks: at S x S for protocol `vpd`, each at its target's size for `original`."""
    if not original:
        return list(logits_to_mask(logits, cached_size).cpu().numpy())
    return [logits_to_mask(logits[k:k + 1], target.shape)[0].cpu().numpy() for k, target in enumerate(targets)]


def _record(metrics: RefSegMetrics, row: int, pred: np.ndarray, target: np.ndarray) -> SampleScore:
    iou = metrics.update(pred, target)
    return SampleScore(row, pred, target, iou, metrics.intersections[-1], metrics.unions[-1])


def _maybe_progress(batches, n: int, progress: bool):
    if not progress:
        yield from batches
        return
    from tqdm.auto import tqdm  # deferred: only a scoring that shows progress needs tqdm

    with tqdm(total=n, unit="sample", desc="eval", dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch["row"]))
