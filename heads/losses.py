"""Training losses, on logits upsampled to the mask resolution S x S (as LAVT/VPD train).

`ce`: cross-entropy with class weights [0.9, 1.1] (background, foreground), VPD's / LAVT's.
`ce+dice`: that plus a soft Dice loss on the foreground probability (optional).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASS_WEIGHTS = (0.9, 1.1)
LOSSES = ("ce", "ce+dice")


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of (B, 2, h, w) logits to `size`, in float32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, batch_total=None) -> torch.Tensor:
    prob = logits.softmax(dim=1)[:, 1]
    target = target.float()
    inter = (prob * target).flatten(1).sum(1)
    total = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    per_sample = 1 - (2 * inter + eps) / (total + eps)
    return per_sample.mean() if batch_total is None else per_sample.sum() / batch_total


def class_weight_total(gt: torch.Tensor) -> torch.Tensor:
    """Sum of the CE class weights over `gt`'s pixels: what weighted cross-entropy divides by."""
    fg = gt.bool().sum(dtype=torch.float32)
    return CLASS_WEIGHTS[0] * (gt.numel() - fg) + CLASS_WEIGHTS[1] * fg


def segmentation_loss(logits: torch.Tensor, gt: torch.Tensor, kind: str = "ce", totals=None) -> torch.Tensor:
    """`logits` (B, 2, h, w) at the head's stride; `gt` (B, S, S) in {0, 1}.

    `totals` = (class-weight total, number of samples) of a larger batch that this one is part of (a
    rank's share under DDP): the loss is then this part's contribution to that batch's loss, and the
    parts' losses add up to it.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r} (choose from {', '.join(LOSSES)})")
    logits = upsample_logits(logits, gt.shape[-2:])
    target = gt.long()
    weight = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=logits.dtype)
    if totals is None:
        loss = F.cross_entropy(logits, target, weight=weight)
    else:
        loss = F.cross_entropy(logits, target, weight=weight, reduction="sum") / totals[0]
    if kind == "ce+dice":
        loss = loss + dice_loss(logits, target, batch_total=None if totals is None else totals[1])
    return loss
