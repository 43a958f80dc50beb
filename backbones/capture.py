"""Capturing what a `FeatureSpec` lists from one UNet forward: decoder features and cross-attention maps.

Features: forward hooks on the spec's modules (`up_blocks.1.attentions.1`, ...) keep their outputs.

Attention: only the `attn2` layers the spec lists get a recording processor. It lets the layer's
own processor (SDPA by default) compute the output, so the UNet's result is bit-identical with
capture on, and separately computes softmax(Q·Kᵀ·scale) from the same inputs, averaged over heads.
That costs one extra Q/K projection per recorded layer (FLOPs with and without capture:
BENCHMARKS.md, "Extraction ... FLOPs per sample") and keeps
self-attention (`attn1`) and every unrecorded layer on the fused kernel. Maps are summed per stride
and divided by the number of layers at that stride.

Early exit: once the last listed tensor is captured, a hook raises to skip the rest of the decoder.
Not on a UNet compiled with `unet.compile()`: an exception raised inside traced code splits the
graph into dozens of pieces and recompiles (BENCHMARKS.md, findings: torch.compile), while the full
forward traces as one graph that is never recompiled. So by default the
capture runs the whole UNet when it is compiled (the skipped part is at most the last up block).

    with UNetCapture(unet, spec) as cap:
        captured = cap.run(latents, timesteps, text_embeddings)   # {"s8": (B,C,H,W), "attn_s16": (B,L,h,w), ...}
"""

from __future__ import annotations

import torch

from refseg.backbones.capture_base import Capture


def _first_tensor(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if hasattr(output, "sample"):  # Transformer2DModelOutput
        return output.sample
    return output[0]  # (hidden_states, ...) tuples


def cross_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale) of an `attn2` layer, averaged over heads: (B, HW, L), float32.

    Q and K are formed exactly as diffusers' `AttnProcessor2_0` forms them.
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    batch, length = key.shape[0], key.shape[1]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale  # (B, heads, HW, L)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, length, batch).view(batch, attn.heads, -1, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1).mean(dim=1)


class _RecordingProcessor:
    """Wraps an `attn2` layer's processor: the output is the wrapped processor's, untouched."""

    def __init__(self, inner, record):
        self.inner, self.record = inner, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        self.record(cross_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask,
                                          kwargs.get("temb")))
        return out


class UNetCapture(Capture):
    """Context manager that records `spec`'s tensors during `run`; the UNet is restored on exit.

    `early_exit`: stop the forward once everything is captured; None (default) = unless the UNet
    was compiled with `unet.compile()` (see the module's docs).
    """

    model_name, layer_kind = "UNet", "attn2"

    @property
    def unet(self):
        return self.model

    def feature_map(self, output, name: str) -> torch.Tensor:
        return _first_tensor(output)

    def recording_processor(self, processor, record):
        return _RecordingProcessor(processor, record)

    def run(self, latents, timesteps, encoder_hidden_states, return_unet_output: bool = False,
            added_cond_kwargs: dict | None = None):
        """One UNet forward; returns {name: float32 (B, C, H, W)} for every tensor of the spec.

        Without `return_unet_output` the forward stops as soon as the last listed tensor is
        captured (the rest of the decoder is not needed; see `early_exit`); with it, returns
        (captured, unet output). `added_cond_kwargs`: SDXL's pooled text + time_ids (None otherwise).
        """
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        return self._run(lambda: self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                           return_dict=False, **extra)[0], return_unet_output)
