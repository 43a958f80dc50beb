"""`film`: the `vpd` decoder with FiLM conditioning on the cached sentence embedding.

The frozen backbone has no trainable text adapter, so this head gets the sentence directly: the
text encoder's embedding is averaged over the valid tokens (`text_mask`), layer-normalised (CLIP's
hidden states have a few very large channels) and an MLP predicts, for every fusion block, a
per-channel scale gamma and shift beta applied to that block's output (Perez et al., 2018).
The MLP's last layer starts at zero, so gamma = 1 and beta = 0: at initialisation the head is
exactly `vpd`, and learns how much to listen to the text.
"""

from __future__ import annotations

import torch
from torch import nn

from refseg.heads.registry import register_head
from refseg.heads.vpd import VPDHead
from refseg.core.feature_spec import FeatureSpec


def pool_text(text_embedding: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens: (B, L, D), (B, L) bool -> (B, D)."""
    if text_mask is None:
        return text_embedding.mean(dim=1)
    m = text_mask.to(text_embedding.dtype).unsqueeze(-1)
    return (text_embedding * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@register_head("film")
class FiLMHead(VPDHead):
    uses_text = True

    def __init__(self, spec: FeatureSpec, *, hidden: int = 640, tensors=None, text_hidden: int | None = None):
        super().__init__(spec, hidden=hidden, tensors=tensors)
        text_hidden = text_hidden or hidden
        self.head_args["text_hidden"] = text_hidden  # None recorded as the width used
        n = len(self.blocks)
        self.film = nn.Sequential(
            nn.LayerNorm(spec.text_dim),
            nn.Linear(spec.text_dim, text_hidden),
            nn.ReLU(),
            nn.Linear(text_hidden, n * 2 * hidden),
        )
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)

    def forward(self, features, text_embedding=None, text_mask=None) -> torch.Tensor:
        if text_embedding is None:
            raise ValueError(f"the {self.head_name} head needs text_embedding (and text_mask) from the cache")
        return self.decode(features, self.modulation(text_embedding, text_mask))

    def modulation(self, text_embedding: torch.Tensor, text_mask: torch.Tensor | None):
        """`modulate(i, x)` for `decode`: fusion block i's output scaled and shifted by the sentence."""
        pooled = pool_text(text_embedding.float(), text_mask)
        gb = self.film(pooled).view(pooled.shape[0], len(self.blocks), 2, self.hidden)
        gamma, beta = 1.0 + gb[:, :, 0], gb[:, :, 1]

        def modulate(i, x):
            return x * gamma[:, i, :, None, None].to(x.dtype) + beta[:, i, :, None, None].to(x.dtype)

        return modulate
