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

Two inputs for grounding (issue 26: half the demo's errors are the wrong object), both off by default:
- `coords`: two channels of normalised x and y joined to every level's tensors (CoordConv), so that
  FiLM can turn "on the left" into a channel scale on a map that knows where the left is;
- `attn_text` = K: K maps made from the cached cross-attention maps of each stride, each a weighted
  sum over the sentence's tokens with weights an MLP reads from each token's embedding (padding
  tokens weigh 0). The attention maps' channels are token positions, which mean other words in
  another sentence; these maps are indexed by what the word is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refseg.core.feature_spec import FeatureSpec, TensorInfo
from refseg.heads.film import FiLMHead
from refseg.heads.registry import register_head
from refseg.heads.vpd import fusion_block

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
                 upsample: str = "convex", coords: bool = False, attn_text: int = 0):
        super().__init__(spec, hidden=hidden, tensors=tensors, text_hidden=text_hidden)
        if upsample not in UPSAMPLERS:
            raise ValueError(f"upsample takes {' or '.join(UPSAMPLERS)} (got {upsample!r})")
        factor = min(t.stride for infos in self.levels for t in infos)
        # the decoder's last step (`decode` ends with self.classifier) draws the logits at full size here
        self.classifier = (ConvexUpsampling if upsample == "convex" else ShuffleUpsampling)(hidden, factor)
        self.coords, self.attn_text = bool(coords), int(attn_text)
        if self.coords or self.attn_text:
            self._add_inputs(spec)

    def _add_inputs(self, spec: FeatureSpec) -> None:
        """Join the made maps to each level's tensors (names starting '+', never read from the cache)
        and rebuild the fusion blocks for the wider inputs."""
        attention = {t.stride for infos in self.levels for t in infos if t.kind == "attention"}
        for infos in self.levels:
            stride, size = infos[0].stride, infos[0].size
            if self.attn_text and stride in attention:
                infos.append(TensorInfo(f"+text_attn_s{stride}", "made", self.attn_text, stride, size, ()))
            if self.coords:
                infos.append(TensorInfo(f"+coords_s{stride}", "made", 2, stride, size, ()))
        if self.attn_text:
            self.token_weights = nn.Sequential(nn.LayerNorm(spec.text_dim), nn.Linear(spec.text_dim, self.attn_text))
        channels = [sum(t.channels for t in infos) for infos in self.levels]
        ins = [channels[0]] if len(channels) == 1 else [channels[0] + channels[1]] + [self.hidden + c for c in channels[2:]]
        self.blocks = nn.ModuleList([fusion_block(c, self.hidden) for c in ins])

    def made_maps(self, features, text_embedding, text_mask) -> dict:
        made = {}
        weights = None
        if self.attn_text:
            weights = self.token_weights(text_embedding.float())  # (B, L, K)
            if text_mask is not None:
                weights = weights * text_mask.to(weights.dtype).unsqueeze(-1)
        for infos in self.levels:
            for t in infos:
                if t.name.startswith("+text_attn_s"):
                    maps = [features[a.name].float() for a in infos if a.kind == "attention"]
                    made[t.name] = sum(torch.einsum("blhw,blk->bkhw", m, weights) for m in maps)
                elif t.name.startswith("+coords_s"):
                    ref = features[infos[0].name]
                    b, _, h, w = ref.shape
                    y = torch.linspace(-1, 1, h, device=ref.device).view(1, 1, h, 1).expand(b, 1, h, w)
                    x = torch.linspace(-1, 1, w, device=ref.device).view(1, 1, 1, w).expand(b, 1, h, w)
                    made[t.name] = torch.cat([x, y], dim=1).to(ref.dtype)
        return made

    def forward(self, features, text_embedding=None, text_mask=None) -> torch.Tensor:
        if text_embedding is None:
            raise ValueError("the film_up head needs text_embedding (and text_mask) from the cache")
        if self.coords or self.attn_text:
            features = {**features, **self.made_maps(features, text_embedding, text_mask)}
        return super().forward(features, text_embedding, text_mask)
