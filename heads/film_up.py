"""`film_up`: the `film` head with a learned upsampling of its logits to the mask size.

`vpd` and `film` stop at the finest stride they read (stride 8 for a UNet: 16×16 logits for a
128-pixel image) and leave the rest to a bilinear resize, which cannot draw an object a few cells
wide: its edges come out as blurred cell boundaries. Here the decoder's last map (`hidden` channels
at that stride) predicts the full-resolution logits itself, guided by the finest features it fused
(at T = 0 those are computed from the clean latent, which holds each cell's content below the cell
size: the VAE decodes the image from it). `upsample`:

- "convex" (RAFT's convex upsampling, Teed & Deng 2020): each output pixel is a convex combination of
  the 3×3 neighbouring cells' logits, with weights predicted per pixel from the map: boundaries move
  inside a cell, values stay those of the coarse logits;
- "shuffle": a 3×3 conv predicts every output pixel's logits directly (factor² × 2 channels, then a
  pixel shuffle).

The factor is the finest stride read, so the logits come out at the image size; training and
evaluation then skip their bilinear resize (it is the identity at the same size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refseg.core.feature_spec import FeatureSpec
from refseg.heads.film import FiLMHead
from refseg.heads.registry import register_head

UPSAMPLERS = ("convex", "shuffle")


class ConvexUpsampling(nn.Module):
    """(B, hidden, h, w) -> (B, 2, h·r, w·r): coarse logits, upsampled by learned convex weights."""

    def __init__(self, hidden: int, factor: int):
        super().__init__()
        self.factor = factor
        self.logits = nn.Conv2d(hidden, 2, 1)
        self.weights = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, 9 * factor * factor, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        r = self.factor
        coarse = self.logits(x)
        weights = self.weights(x).view(b, 1, 9, r, r, h, w).softmax(dim=2)
        neighbours = F.unfold(coarse, 3, padding=1).view(b, 2, 9, 1, 1, h, w)
        up = (weights * neighbours).sum(dim=2)  # (b, 2, r, r, h, w)
        return up.permute(0, 1, 4, 2, 5, 3).reshape(b, 2, h * r, w * r)


class ShuffleUpsampling(nn.Module):
    """(B, hidden, h, w) -> (B, 2, h·r, w·r): every output pixel's logits from a 3×3 conv, pixel-shuffled."""

    def __init__(self, hidden: int, factor: int):
        super().__init__()
        self.conv = nn.Conv2d(hidden, 2 * factor * factor, 3, padding=1)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


@register_head("film_up")
class FiLMUpHead(FiLMHead):
    def __init__(self, spec: FeatureSpec, *, hidden: int = 640, tensors=None, text_hidden: int | None = None,
                 upsample: str = "convex"):
        super().__init__(spec, hidden=hidden, tensors=tensors, text_hidden=text_hidden)
        if upsample not in UPSAMPLERS:
            raise ValueError(f"upsample takes {' or '.join(UPSAMPLERS)} (got {upsample!r})")
        factor = min(t.stride for infos in self.levels for t in infos)
        # the decoder's last step (`decode` ends with self.classifier) now draws the logits at full size
        self.classifier = (ConvexUpsampling if upsample == "convex" else ShuffleUpsampling)(hidden, factor)
