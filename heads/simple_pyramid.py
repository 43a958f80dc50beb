"""`pyramid`: ViTDet's simple feature pyramid on a one-stride spec, decoded as `vpd` decodes SD's levels.

A diffusion transformer (SD3, FLUX) gives every feature at one stride (16), so the multi-scale
decoders have nothing to fuse. As ViTDet (Li et al., 2022, "simple feature pyramid") does for a plain
ViT, this head builds the levels from the single map: 2x2 max-pooling for the coarser stride,
stride-2 transposed convolutions for the finer ones (two, with norm and GELU between, for x4), then
per level a 1x1 conv and a 3x3 conv, each followed by a norm. The levels are decoded top-down like
`vpd` (upsample, concatenate, [3x3 conv -> BN -> ReLU] x 2), to 2 logits at the finest level.

Departures from ViTDet, and why: the input (every tensor read, features and maps, concatenated) is
first reduced by a 1x1 conv to `hidden` channels, because a DiT's concatenated blocks are thousands
of channels wide (FLUX: 3 x 3072 + maps) and ViTDet's transposed convolutions on them would dominate
the head; BatchNorm stands in for ViTDet's LayerNorm, as in the other heads. The default strides
(32, 16, 8) are the ones `vpd` decodes on SD1.5 minus the finest, so the logits come at stride 8 as
there. On a spec with several strides, pick one with `tensors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refseg.core.feature_spec import FeatureSpec
from refseg.heads.base import Head
from refseg.heads.levels import concat_level, levels_by_stride
from refseg.heads.registry import register_head
from refseg.heads.vpd import fusion_block


def conv_norm(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


def rescale(channels: int, factor: float) -> nn.Module:
    """ViTDet's per-level resampling: x4 = deconv, norm, GELU, deconv; x2 = deconv; x1 = identity; x0.5 = max-pool."""
    if factor == 4:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.BatchNorm2d(channels), nn.GELU(),
                             nn.ConvTranspose2d(channels, channels, 2, stride=2))
    if factor == 2:
        return nn.ConvTranspose2d(channels, channels, 2, stride=2)
    if factor == 1:
        return nn.Identity()
    if factor == 0.5:
        return nn.MaxPool2d(2, stride=2)
    raise ValueError(f"a simple pyramid rescales by 4, 2, 1 or 1/2 (got {factor:g})")


@register_head("pyramid")
class SimplePyramidHead(Head):
    """ViTDet simple feature pyramid + VPD decoding. `strides`: the pyramid's levels (source stride x 4 ... x 1/4)."""

    uses_text = False

    def __init__(self, spec: FeatureSpec, *, hidden: int = 256, tensors=None, strides=(32, 16, 8)):
        super().__init__()
        levels = levels_by_stride(spec, tensors)
        if len(levels) != 1:
            found = ", ".join(str(s) for s, _ in levels)
            raise ValueError(f"the pyramid head builds its levels from one stride, but the tensors read are at "
                             f"strides {found}: choose one stride's tensors with `tensors`")
        self.source_stride, self.inputs = levels[0]
        self.tensor_names = [t.name for t in self.inputs]
        self.head_args["tensors"] = self.tensor_names  # None (all) recorded as what is read
        self.strides = sorted({int(s) for s in strides}, reverse=True)  # coarsest first
        self.head_args["strides"] = self.strides
        self.hidden = hidden
        self.reduce = nn.Sequential(conv_norm(sum(t.channels for t in self.inputs), hidden, 1), nn.GELU())
        self.rescale = nn.ModuleList([rescale(hidden, self.source_stride / s) for s in self.strides])
        self.lateral = nn.ModuleList([nn.Sequential(conv_norm(hidden, hidden, 1), conv_norm(hidden, hidden, 3))
                                      for _ in self.strides])
        n = len(self.strides)
        self.blocks = nn.ModuleList([fusion_block(hidden if n == 1 else 2 * hidden, hidden)
                                     for _ in range(max(1, n - 1))])
        self.classifier = nn.Conv2d(hidden, 2, 1)

    def pyramid(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The levels, coarsest first: (B, hidden, S/stride, S/stride) each."""
        x = self.reduce(concat_level(features, self.inputs))
        return [lateral(resample(x)) for resample, lateral in zip(self.rescale, self.lateral)]

    def forward(self, features, text_embedding=None, text_mask=None) -> torch.Tensor:
        levels = self.pyramid(features)
        x = levels[0] if len(levels) > 1 else self.blocks[0](levels[0])
        for block, skip in zip(self.blocks, levels[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)
