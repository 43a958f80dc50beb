"""What the UNet capture (backbones/capture.py) and the joint-attention capture (backbones/joint_capture.py)
share: installing forward hooks and recording processors on the modules a `FeatureSpec` lists, summing
each attention tensor's maps over its layers, stopping the forward early once everything is captured,
and checking that every listed tensor was produced. A subclass says how to turn a module's output into
a feature map, how to wrap a layer's processor, and how to call its model.
"""

from __future__ import annotations

import math

import torch

from refseg.core.feature_spec import FeatureSpec


class _Done(Exception):
    """Raised from a hook once everything is captured, to skip the rest of the forward."""


def tokens_to_map(tokens: torch.Tensor, name: str) -> torch.Tensor:
    """(B, N, C) per-position values -> (B, C, side, side): image positions in row-major order, as
    diffusers flattens a UNet level (attn2's queries) and a DiT's patches."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name}: {n} image positions are not a square grid (images are squashed square)")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


class Capture:
    """Context manager that records `spec`'s tensors during one forward; the model is restored on exit.

    `early_exit`: stop the forward once everything is captured; None (default) = unless the model was
    compiled with `.compile()` (backbones/capture.py says why).
    """

    model_name = "model"  # for messages: "UNet", "transformer"
    layer_kind = "attention"  # for messages: "attn2", "joint-attention"

    def __init__(self, model, spec: FeatureSpec, early_exit: bool | None = None):
        self.model, self.spec, self.early_exit = model, spec, early_exit
        self.layer_calls: dict[str, int] = {}  # attention tensor -> layer calls seen in the last run
        self._handles, self._processors = [], {}
        self._features: dict[str, torch.Tensor] = {}
        self._attn_sum: dict[str, torch.Tensor] = {}
        self._pending = 0
        self._stop_early = False

    # ---- what a subclass says -----------------------------------------------------------------------
    def feature_map(self, output, name: str) -> torch.Tensor:
        """A hooked module's output as a (B, C, h, w) tensor."""
        raise NotImplementedError

    def recording_processor(self, processor, record):
        """`processor` wrapped so that it also calls `record(probs)` with its layer's text-token
        attention probabilities (B, image positions, L), averaged over heads, float32."""
        raise NotImplementedError

    # ---- installing / removing ----------------------------------------------------------------------
    def __enter__(self):
        try:
            for info in self.spec.features:
                (module,) = info.modules
                hook = self._feature_hook(info.name)
                self._handles.append(self.model.get_submodule(module).register_forward_hook(hook))
            for info in self.spec.attention:
                for module in info.modules:
                    attn = self.model.get_submodule(module)
                    self._processors[module] = attn.processor
                    attn.set_processor(self.recording_processor(attn.processor, self._attention_recorder(info.name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, processor in self._processors.items():
            self.model.get_submodule(module).set_processor(processor)
        self._handles, self._processors = [], {}

    def _feature_hook(self, name: str):
        def hook(module, args, output):
            self._features[name] = self.feature_map(output, name).detach().to(torch.float32, copy=True)
            self._count_down()

        return hook

    def _attention_recorder(self, name: str):
        def record(probs: torch.Tensor) -> None:  # (B, N, L) -> (B, L, h, w), summed over the tensor's layers
            maps = tokens_to_map(probs, name)
            self._attn_sum[name] = maps if name not in self._attn_sum else self._attn_sum[name] + maps
            self.layer_calls[name] = self.layer_calls.get(name, 0) + 1
            self._count_down()

        return record

    def _count_down(self) -> None:
        self._pending -= 1
        if self._stop_early and self._pending == 0:
            raise _Done

    # ---- running ------------------------------------------------------------------------------------
    def _early_exit(self) -> bool:
        if self.early_exit is not None:
            return bool(self.early_exit)
        return getattr(self.model, "_compiled_call_impl", None) is None  # set by nn.Module.compile()

    def _run(self, forward, return_output: bool):
        """`forward()` once with the hooks on; -> {name: float32 (B, C, h, w)} in the spec's order, and
        forward's result too with `return_output` (which runs the whole forward)."""
        if not self._handles and not self._processors:
            raise RuntimeError(f"{type(self).__name__}.run must be called inside `with {type(self).__name__}(...)`")
        self._features, self._attn_sum, self.layer_calls = {}, {}, {}
        self._pending = len(self.spec.features) + sum(len(t.modules) for t in self.spec.attention)
        self._stop_early = not return_output and self._early_exit()
        output = None
        with torch.inference_mode():
            try:
                output = forward()
            except _Done:
                pass
        captured = dict(self._features)
        for info in self.spec.attention:
            calls = self.layer_calls.get(info.name, 0)
            if calls != len(info.modules):
                raise RuntimeError(f"{info.name}: {calls} {self.layer_kind} calls recorded, expected {len(info.modules)}")
            captured[info.name] = self._attn_sum[info.name] / calls
        missing = [t.name for t in self.spec.tensors if t.name not in captured]
        if missing:
            raise RuntimeError(f"{self.model_name} forward did not produce {', '.join(missing)}")
        self._features, self._attn_sum = {}, {}
        captured = {t.name: captured[t.name] for t in self.spec.tensors}
        return (captured, output) if return_output else captured
