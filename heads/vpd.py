"""`vpd`: the LAVT/VPD `SimpleDecoding` mask decoder, for whatever strides the spec holds.

Start at the coarsest stride; at each finer stride, upsample the running map bilinearly
(align_corners=True) to that stride's size, concatenate the stride's tensors (features, then the
cross-attention maps of the same stride, as VPD does), and fuse with [3x3 conv (no bias) -> BN ->
ReLU] x 2 to `hidden` channels. With Stable Diffusion's four levels that is three fusion blocks
(LAVT's conv*_4, conv*_3, conv*_2), then a 1x1 conv to 2 logits at stride 8. The coarsest stride's
attention maps are concatenated to its features before the first fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refseg.heads.base import Head
from refseg.heads.levels import concat_level, levels_by_stride
from refseg.heads.registry import register_head
from refseg.core.feature_spec import FeatureSpec


def fusion_block(in_channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
    )


@register_head("vpd")
class VPDHead(Head):
    """LAVT/VPD SimpleDecoding. `tensors` restricts which cached tensors are read (default: all)."""

    uses_text = False

    def __init__(self, spec: FeatureSpec, *, hidden: int = 640, tensors=None):
        super().__init__()
        levels = levels_by_stride(spec, tensors)
        self.levels = [[t for t in infos] for _, infos in levels]
        self.tensor_names = [t.name for infos in self.levels for t in infos]
        self.head_args["tensors"] = self.tensor_names  # None (all) recorded as what is read
        self.hidden = hidden

        channels = [sum(t.channels for t in infos) for infos in self.levels]
        if len(channels) == 1:  # a single stride: one block on it alone, nothing to fuse
            self.blocks = nn.ModuleList([fusion_block(channels[0], hidden)])
        else:
            ins = [channels[0] + channels[1]] + [hidden + c for c in channels[2:]]
            self.blocks = nn.ModuleList([fusion_block(c, hidden) for c in ins])
        self.classifier = nn.Conv2d(hidden, 2, 1)

    def decode(self, features: dict[str, torch.Tensor], modulate=None) -> torch.Tensor:
        """Run the decoder; `modulate(i, x)` (FiLM) is applied to the output of fusion block i."""
        x = concat_level(features, self.levels[0])
        if len(self.levels) == 1:
            x = self.blocks[0](x)
            if modulate is not None:
                x = modulate(0, x)
        for i, infos in enumerate(self.levels[1:]):
            skip = concat_level(features, infos)
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = self.blocks[i](torch.cat([x, skip], dim=1))
            if modulate is not None:
                x = modulate(i, x)
        return self.classifier(x)

    def forward(self, features, text_embedding=None, text_mask=None) -> torch.Tensor:
        return self.decode(features)
