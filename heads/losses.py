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


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = logits.softmax(dim=1)[:, 1]
    target = target.float()
    inter = (prob * target).flatten(1).sum(1)
    total = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def segmentation_loss(logits: torch.Tensor, gt: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """`logits` (B, 2, h, w) at the head's stride; `gt` (B, S, S) in {0, 1}."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r} (choose from {', '.join(LOSSES)})")
    logits = upsample_logits(logits, gt.shape[-2:])
    target = gt.long()
    weight = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=logits.dtype)
    loss = F.cross_entropy(logits, target, weight=weight)
    if kind == "ce+dice":
        loss = loss + dice_loss(logits, target)
    return loss
