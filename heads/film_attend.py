"""`film_attend`: the `film` head with attention between the decoder's cells and the sentence's words.

`film` hears the sentence as one pooled vector: a bag of words, the same at every cell. A sentence
like "the red circle on the left" or "the square above the green star" needs more than that: find
the cells that match some words, then compare them across the image (which red circle is leftmost,
which square is above the star). After each of the `levels` coarsest fusion blocks (and its FiLM),
one pre-norm transformer block (Vaswani et al., 2017) does that:

1. cross-attention: each cell reads the sentence's tokens (padding masked), as LAVT's pixel-word
   attention does;
2. self-attention: each cell reads every other cell of the level, with a learned embedding of its
   normalised (x, y) so that "left of" and "above" have a direction;
3. an MLP.

Every step's output projection starts at zero, so at initialisation the head is exactly `film`.

Why the coarsest levels only (2 by default: 4×4 and 8×8 cells at the demo's 128 px, 16×16 and 32×32
for SD at 512): choosing the object is a decision over few cells, and the finer blocks draw its
shape. On the demo's reduced study (BENCHMARKS.md, "Levers on the demo") a third block at 16×16 cost
twice the training time and scored lower (oIoU 41.4 ± 4.4 against 43.3 ± 1.2).
"""

from __future__ import annotations

import torch
from torch import nn

from refseg.core.feature_spec import FeatureSpec
from refseg.heads.film import FiLMHead
from refseg.heads.registry import register_head


class CellsAndWords(nn.Module):
    """(B, C, H, W) cells, (B, L, D) words -> (B, C, H, W): the transformer block described above."""

    def __init__(self, hidden: int, text_dim: int, heads: int):
        super().__init__()
        self.words = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden))
        self.where = nn.Linear(2, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(3)])
        self.read_words = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.read_cells = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        for last in (self.read_words.out_proj, self.read_cells.out_proj, self.mlp[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, h * w, 2)
        cells = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        where = self.where(grid)  # joined to queries and keys only, so the residual stream starts as x
        words = self.words(text.to(x.dtype))
        # a sentence with no valid token (never from the cache) would make every score -inf: read them all
        padding = None if text_mask is None else ~text_mask.bool()
        if padding is not None:
            padding = padding & ~padding.all(dim=1, keepdim=True)
        q = self.norms[0](cells) + where
        cells = cells + self.read_words(q, words, words, key_padding_mask=padding, need_weights=False)[0]
        v = self.norms[1](cells)
        cells = cells + self.read_cells(v + where, v + where, v, need_weights=False)[0]
        cells = cells + self.mlp(self.norms[2](cells))
        return cells.transpose(1, 2).reshape(b, c, h, w)


@register_head("film_attend")
class FiLMAttendHead(FiLMHead):
    def __init__(self, spec: FeatureSpec, *, hidden: int = 640, tensors=None, text_hidden: int | None = None,
                 heads: int = 4, levels: int = 2):
        super().__init__(spec, hidden=hidden, tensors=tensors, text_hidden=text_hidden)
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if levels < 1:
            raise ValueError(f"levels must be at least 1 (got {levels})")
        self.head_args.update(heads=heads, levels=levels)
        # fusion block i is the decoder's i-th, coarsest first (vpd.decode): blocks 0 .. levels-1 attend
        self.attend = nn.ModuleList([CellsAndWords(hidden, spec.text_dim, heads)
                                     for _ in range(min(levels, len(self.blocks)))])

    def modulation(self, text_embedding: torch.Tensor, text_mask: torch.Tensor | None):
        """film's scale and shift, then (on the first `levels` blocks) the cells reading the words."""
        film = super().modulation(text_embedding, text_mask)
        text = text_embedding.float()

        def modulate(i, x):
            x = film(i, x)
            return self.attend[i](x, text, text_mask) if i < len(self.attend) else x

        return modulate
