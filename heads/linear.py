"""`linear`: a per-pixel linear probe, the cheapest baseline.

Every tensor the head reads (features and attention maps) is upsampled bilinearly
(align_corners=True) to the finest stride (8), concatenated, and a 1x1 conv gives 2 logits.
With `norm=True` (default) the inputs first pass a BatchNorm without affine parameters, as MAE's
linear probe does: the UNet's levels differ in scale by orders of magnitude, and a fixed per-channel
standardisation keeps the probe linear at test time while making it trainable at one learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refseg.heads.base import Head
from refseg.heads.levels import levels_by_stride
from refseg.heads.registry import register_head
from refseg.core.feature_spec import FeatureSpec


@register_head("linear")
class LinearHead(Head):
    uses_text = False

    def __init__(self, spec: FeatureSpec, *, tensors=None, norm: bool = True):
        super().__init__()
        levels = levels_by_stride(spec, tensors)
        self.inputs = [t for _, infos in levels for t in infos]
        self.tensor_names = [t.name for t in self.inputs]
        self.head_args["tensors"] = self.tensor_names  # None (all) recorded as what is read
        channels = sum(t.channels for t in self.inputs)
        self.norm = nn.BatchNorm2d(channels, affine=False) if norm else nn.Identity()
        self.classifier = nn.Conv2d(channels, 2, 1)

    def forward(self, features, text_embedding=None, text_mask=None) -> torch.Tensor:
        finest = features[self.inputs[-1].name]
        size = finest.shape[-2:]
        xs = [features[t.name] if features[t.name].shape[-2:] == size
              else F.interpolate(features[t.name], size=size, mode="bilinear", align_corners=True)
              for t in self.inputs]
        return self.classifier(self.norm(torch.cat(xs, dim=1)))
