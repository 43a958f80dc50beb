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

import math

import torch

from refseg.core.feature_spec import FeatureSpec


class _Done(Exception):
    """Raised from a hook once everything is captured, to skip the rest of the UNet."""


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


class UNetCapture:
    """Context manager that records `spec`'s tensors during `run`; the UNet is restored on exit.

    `early_exit`: stop the forward once everything is captured; None (default) = unless the UNet
    was compiled with `unet.compile()` (see the module's docs).
    """

    def __init__(self, unet, spec: FeatureSpec, early_exit: bool | None = None):
        self.unet, self.spec = unet, spec
        self.early_exit = early_exit
        self.layer_calls: dict[str, int] = {}  # attention tensor -> attn2 calls seen in the last run
        self._handles, self._processors = [], {}
        self._features: dict[str, torch.Tensor] = {}
        self._attn_sum: dict[str, torch.Tensor] = {}
        self._pending = 0
        self._stop_early = False

    # ---- installing / removing --------------------------------------------------------------------
    def __enter__(self) -> "UNetCapture":
        try:
            for info in self.spec.features:
                (module,) = info.modules
                hook = self._feature_hook(info.name)
                self._handles.append(self.unet.get_submodule(module).register_forward_hook(hook))
            for info in self.spec.attention:
                for module in info.modules:
                    attn = self.unet.get_submodule(module)
                    self._processors[module] = attn.processor
                    attn.set_processor(_RecordingProcessor(attn.processor, self._attention_recorder(info.name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, processor in self._processors.items():
            self.unet.get_submodule(module).set_processor(processor)
        self._handles, self._processors = [], {}

    def _feature_hook(self, name: str):
        def hook(module, args, output):
            self._features[name] = _first_tensor(output).detach().to(torch.float32, copy=True)
            self._count_down()

        return hook

    def _attention_recorder(self, name: str):
        def record(probs: torch.Tensor) -> None:  # (B, HW, L) -> (B, L, h, w)
            b, hw, length = probs.shape
            side = math.isqrt(hw)
            if side * side != hw:
                raise ValueError(f"{name}: attention over {hw} positions is not a square map (images are squashed square)")
            maps = probs.transpose(1, 2).reshape(b, length, side, side)
            self._attn_sum[name] = maps if name not in self._attn_sum else self._attn_sum[name] + maps
            self.layer_calls[name] = self.layer_calls.get(name, 0) + 1
            self._count_down()

        return record

    def _count_down(self) -> None:
        self._pending -= 1
        if self._stop_early and self._pending == 0:
            raise _Done

    # ---- running ----------------------------------------------------------------------------------
    def _early_exit(self) -> bool:
        if self.early_exit is not None:
            return bool(self.early_exit)
        return getattr(self.unet, "_compiled_call_impl", None) is None  # set by nn.Module.compile()

    def run(self, latents, timesteps, encoder_hidden_states, return_unet_output: bool = False):
        """One UNet forward; returns {name: float32 (B, C, H, W)} for every tensor of the spec.

        Without `return_unet_output` the forward stops as soon as the last listed tensor is
        captured (the rest of the decoder is not needed; see `early_exit`); with it, returns
        (captured, unet output).
        """
        if not self._handles and not self._processors:
            raise RuntimeError("UNetCapture.run must be called inside `with UNetCapture(...)`")
        self._features, self._attn_sum, self.layer_calls = {}, {}, {}
        self._pending = len(self.spec.features) + sum(len(t.modules) for t in self.spec.attention)
        self._stop_early = not return_unet_output and self._early_exit()
        eps = None
        with torch.inference_mode():
            try:
                eps = self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            except _Done:
                pass
        captured = dict(self._features)
        for info in self.spec.attention:
            calls = self.layer_calls.get(info.name, 0)
            if calls != len(info.modules):
                raise RuntimeError(f"{info.name}: {calls} attn2 calls recorded, expected {len(info.modules)}")
            captured[info.name] = self._attn_sum[info.name] / calls
        missing = [t.name for t in self.spec.tensors if t.name not in captured]
        if missing:
            raise RuntimeError(f"UNet forward did not produce {', '.join(missing)}")
        self._features, self._attn_sum = {}, {}
        captured = {t.name: captured[t.name] for t in self.spec.tensors}
        return (captured, eps) if return_unet_output else captured
