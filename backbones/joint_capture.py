"""Capturing what a `FeatureSpec` lists from one joint-attention transformer forward (SD3's MMDiT, FLUX).

Features: a forward hook on each listed block (`transformer_blocks.7`, `single_transformer_blocks.30`)
keeps the block's image-token hidden states: the second element of the (text, image) pair every
SD3/FLUX block returns (FLUX's single-stream blocks return the pair too; a block that returns the
joint sequence gives its image part). Tokens are row-major over the (h, w) grid of 2x2 latent
patches, so they reshape to (B, C, h, w) at stride 16 (patch 2 x VAE 8).

Text-token attention maps (docs/DESIGN.md §5): the image-query x text-key block of the layer's joint
attention, **renormalised over the text keys**: softmax over the text keys alone of the same logits,
= the full softmax's image->text block divided by its row sums. That is what a UNet's `attn2` map is
(its keys are the text alone), so every family's maps mean the same thing: which tokens an image
position reads, among the tokens, summing to 1 over the tokens. Q and K are formed exactly as
diffusers' processors form them (JointAttnProcessor2_0, FluxAttnProcessor): the layer's own
projections, its RMSNorm q/k norms, and for FLUX the rotary embedding of the joint sequence (text
positions first, then image). Scores in float32, averaged over heads.

Memory: the full (text + image)^2 map is never formed. Image queries are taken `chunk` at a time,
so the transient is O(B x heads x chunk x L_text) plus the layer's Q for the image tokens
(O(N_img x D), what the layer holds anyway); `capture_peak_bytes` totals a whole captured forward.
As in backbones/capture.py, a recording processor wraps the layer's own processor, which computes
the layer's output: the transformer's output is bit-identical with capture on.

    with JointCapture(transformer, spec, forward) as cap:
        captured = cap.run(latents, noise, text)   # {"j12_s16": (B,C,h,w), "attn_j12_s16": (B,L,h,w), ...}
"""

from __future__ import annotations

import torch

from refseg.core.feature_spec import FeatureSpec
from refseg.backbones.capture_base import Capture, tokens_to_map

DEFAULT_CHUNK = 1024  # image queries per score block


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, heads*head_dim) -> (B, S, heads, head_dim), as FluxAttnProcessor unflattens."""
    return x.unflatten(-1, (-1, head_dim))


def _rope(x: torch.Tensor, rotary, rows: slice) -> torch.Tensor:
    """FLUX's rotary embedding on (B, S, heads, head_dim) for joint-sequence positions `rows`."""
    # deferred: diffusers is heavy and the family registry imports this module
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=1)


def _norm(module, x):
    return x if module is None else module(x)


def text_attention_probs(attn, image: torch.Tensor, text: torch.Tensor, *, added: bool, rotary=None,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Image-query x text-key attention of a joint layer, renormalised over text keys: (B, N_img, L_text), float32.

    `image` (B, N, D) and `text` (B, L, D) are the layer's inputs. `added`: the text goes through the
    layer's added projections (`add_k_proj`, `norm_added_k`: SD3 blocks, FLUX double-stream blocks);
    otherwise through `to_k`/`norm_k` (FLUX single-stream blocks, whose input is the joint sequence).
    `rotary`: FLUX's (cos, sin) over the joint sequence, text positions first.
    """
    head_dim = attn.to_q.out_features // attn.heads
    n_text, n_image = text.shape[1], image.shape[1]
    query = _norm(attn.norm_q, _heads(attn.to_q(image), head_dim))
    if added:
        key = _norm(attn.norm_added_k, _heads(attn.add_k_proj(text), head_dim))
    else:
        key = _norm(attn.norm_k, _heads(attn.to_k(text), head_dim))
    if rotary is not None:
        query = _rope(query, rotary, slice(n_text, n_text + n_image))
        key = _rope(key, rotary, slice(0, n_text))
    key = key.float().permute(0, 2, 3, 1)  # (B, heads, head_dim, L)
    scale = head_dim**-0.5  # SDPA's default, which both processors use
    out = torch.empty(image.shape[0], n_image, n_text, dtype=torch.float32, device=image.device)
    for start in range(0, n_image, chunk):
        q = query[:, start:start + chunk].float().transpose(1, 2)  # (B, heads, chunk, head_dim)
        out[:, start:start + chunk] = ((q @ key) * scale).softmax(dim=-1).mean(dim=1)
    return out


class _RecordingProcessor:
    """Wraps a joint layer's processor: the output is the wrapped processor's, untouched.

    The signature names every argument diffusers' attention modules pass (FluxAttention filters the
    keywords by the processor's signature).
    """

    def __init__(self, inner, record, text_length, chunk):
        self.inner, self.record, self.text_length, self.chunk = inner, record, text_length, chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        if encoder_hidden_states is not None:  # two streams: image = hidden_states, text = encoder_hidden_states
            image, text, added = hidden_states, encoder_hidden_states, True
        else:  # FLUX single-stream: one joint sequence, text first
            n = self.text_length()
            image, text, added = hidden_states[:, n:], hidden_states[:, :n], False
        self.record(text_attention_probs(attn, image, text, added=added, rotary=image_rotary_emb, chunk=self.chunk))
        return out


def image_tokens(output, text_length: int) -> torch.Tensor:
    """A block's image-token hidden states (B, N, C) from its output."""
    if isinstance(output, (tuple, list)):
        return output[1]  # (encoder_hidden_states, hidden_states)
    return output[:, text_length:]  # a joint sequence, text first


class JointCapture(Capture):
    """Context manager that records `spec`'s tensors during `run`; the transformer is restored on exit.

    `forward(latents, noise, text)` runs the transformer as the family's pipeline calls it and returns
    its output (the velocity, in the latents' layout). `early_exit`: stop once everything is captured;
    None (default) = unless the transformer was compiled with `.compile()` (backbones/capture.py says why).
    """

    model_name, layer_kind = "transformer", "joint-attention"

    def __init__(self, transformer, spec: FeatureSpec, forward, early_exit: bool | None = None,
                 chunk: int = DEFAULT_CHUNK):
        super().__init__(transformer, spec, early_exit)
        self.forward, self.chunk = forward, chunk
        self._text_length = 0  # of the running batch: where a single-stream block's image tokens start

    @property
    def transformer(self):
        return self.model

    def feature_map(self, output, name: str) -> torch.Tensor:
        return tokens_to_map(image_tokens(output, self._text_length), name)

    def recording_processor(self, processor, record):
        return _RecordingProcessor(processor, record, lambda: self._text_length, self.chunk)

    def run(self, latents, noise, text, return_output: bool = False):
        """One transformer forward; {name: float32 (B, C, h, w)} for every tensor of the spec
        (and the transformer's output with `return_output`, which runs the whole forward)."""
        self._text_length = int(text.embedding.shape[1])
        return self._run(lambda: self.forward(latents, noise, text), return_output)


def capture_peak_bytes(*, params: int, resident_params: int = 0, hidden: int, heads: int, mlp_ratio: float = 4.0,
                       image_tokens: int, text_tokens: int, n_features: int, n_maps: int, batch: int = 1,
                       itemsize: int = 2, chunk: int = DEFAULT_CHUNK) -> dict[str, int]:
    """The peak device memory of one captured transformer forward, by part (bytes), computed analytically.

    - `weights`: the transformer's `params` plus `resident_params` (text encoders, VAE) left on the device.
    - `block`: the largest block's live activations under inference mode (nothing is kept for a
      backward): a FLUX single-stream block holds its input, the normed input, Q, K, V, the attention
      output, the MLP branch (mlp_ratio x hidden, before and after GELU), their concatenation and the
      projection; RoPE makes float32 copies of Q and K. Attention itself runs in SDPA's fused kernels
      (flash / memory-efficient), whose workspace is O(tokens x hidden), counted as one more tensor.
    - `capture_layer`: what recording one layer's map adds while it runs: Q of the image tokens (model
      dtype, and float32 after RoPE), K of the text tokens (float32), the map (B x N_img x L, float32)
      and one chunk of scores with its softmax (B x heads x chunk x L float32, three live copies).
      Never the full (L + N_img)^2 map.
    - `captured`: the float32 features (B x hidden x N_img each) and maps (B x L x N_img each) held
      until the forward ends.
    """
    seq = image_tokens + text_tokens
    mlp = int(hidden * mlp_ratio)
    act = batch * seq * itemsize
    block = act * (hidden * 7 + mlp * 2 + (hidden + mlp) + hidden) + 2 * batch * seq * hidden * 4
    n_chunk = min(chunk, image_tokens)
    capture_layer = (batch * image_tokens * hidden * (itemsize + 4) + batch * text_tokens * hidden * (itemsize + 4)
                     + batch * image_tokens * text_tokens * 4 + 3 * batch * heads * n_chunk * text_tokens * 4)
    captured = batch * image_tokens * 4 * (n_features * hidden + n_maps * text_tokens)
    parts = {"weights": (params + resident_params) * itemsize, "block": block, "capture_layer": capture_layer,
             "captured": captured}
    parts["total"] = sum(parts.values())
    parts["full_map_per_layer"] = batch * heads * seq * seq * itemsize  # what a naive map would take, for comparison
    return parts
