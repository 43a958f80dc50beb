"""What every head provides: the contract training, evaluation and the run directory rely on.

A head is built from a `FeatureSpec` (never from hard-coded channel counts) and its own keyword
arguments, reads some of the cached tensors and returns 2-class logits at the finest stride it reads
(stride 8 for Stable Diffusion features); training and evaluation upsample them to the mask size.
Adding one: docs/HEADS.md.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


class Head(nn.Module):
    """Base class of the heads. A subclass sets `tensor_names` in `__init__` and says `uses_text`.

    `head_args` is recorded for it: the constructor's keyword arguments with their defaults filled in
    (not `spec`), before its `__init__` body runs. `config.json` stores them and `build_head(name,
    spec, **head_args)` rebuilds the same head from them, so an argument cannot be forgotten. An
    argument left to the head (a `None` default it resolves) is written back as resolved, e.g.
    `self.head_args["tensors"] = self.tensor_names`, so the run says what was built.
    """

    head_name: str  # set by @register_head
    uses_text: bool = False  # whether forward needs the sentence (text_embedding, text_mask)
    tensor_names: list[str]  # the cached tensors forward reads, in the order it reads them
    head_args: dict  # recorded from the constructor's arguments (above)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_head_args(cls.__init__)

    def forward(self, features: dict[str, torch.Tensor], text_embedding: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features {name: (B, C, h, w)}, text_embedding (B, L, D), text_mask (B, L) bool -> logits (B, 2, H, W)."""
        raise NotImplementedError


def _recording_head_args(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, spec, *args, **kwargs):
        # Only the outermost (most derived) constructor records: a head built on another (film on
        # vpd) calls its parent's __init__, whose arguments are not the ones that rebuild it.
        if "head_args" not in self.__dict__:
            bound = signature.bind(self, spec, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[2:]:  # after self and spec
                is_var_keyword = signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
                recorded.update(value if is_var_keyword else {name: value})
            object.__setattr__(self, "head_args", recorded)  # before nn.Module.__init__: a plain attribute
        init(self, spec, *args, **kwargs)

    return __init__
