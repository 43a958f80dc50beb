"""The head registry: `HEADS` maps a name to a head class; a new head is one new file (+ its name in BUILTIN_HEADS).

A head is an `nn.Module` built from a `FeatureSpec` (never from hard-coded channel counts) with
`forward(features: dict[str, Tensor], text_embedding=None, text_mask=None) -> logits (B, 2, H, W)`
at the finest stride it reads (stride 8 for Stable Diffusion features). It says what it reads:
`tensor_names` (the cached tensors to load) and `uses_text` (whether it needs the sentence).
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from refseg.core.feature_spec import FeatureSpec, TensorInfo

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    """Class decorator: `@register_head("vpd")` makes the head buildable by name."""

    def decorate(cls):
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"a head named {name!r} is already registered ({HEADS[name].__name__})")
        cls.head_name = name
        HEADS[name] = cls
        return cls

    return decorate


def build_head(name: str, spec: FeatureSpec, **head_args) -> nn.Module:
    """Build head `name` for the tensors in `spec`; `head_args` are the head's own options (hidden=...)."""
    _load_builtin_heads()
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r} (available: {', '.join(sorted(HEADS))})")
    return HEADS[name](spec, **head_args)


# The modules of the heads that ship with refseg. A new head is one new file holding a class decorated
# with `@register_head("name")`, and its module name here (code outside refseg can register its own
# heads by importing a module that uses the decorator, before `build_head`).
BUILTIN_HEADS = ("vpd", "linear", "film")


def _load_builtin_heads() -> None:
    import importlib

    for module in BUILTIN_HEADS:
        importlib.import_module(f"refseg.heads.{module}")  # importing a head module registers it


def head_names() -> list[str]:
    _load_builtin_heads()
    return sorted(HEADS)


def levels_by_stride(spec: FeatureSpec, tensors=None) -> list[tuple[int, list[TensorInfo]]]:
    """The spec's tensors grouped by stride, coarsest first: `[(32, [s32, attn_s32]), (16, ...), ...]`.

    Within a stride the feature map comes first, then its attention maps: VPD concatenates the
    cross-attention maps to the features of the same stride. `tensors` restricts the names read.
    """
    chosen = spec.tensors if tensors is None else [spec[n] for n in tensors]
    if not chosen:
        raise ValueError("a head needs at least one tensor to read")
    groups: dict[int, list[TensorInfo]] = defaultdict(list)
    for t in chosen:
        groups[t.stride].append(t)
    kind_order = {"feature": 0, "attention": 1}
    return [(s, sorted(groups[s], key=lambda t: (kind_order.get(t.kind, 2), t.name)))
            for s in sorted(groups, reverse=True)]


def concat_level(features: dict, infos: list[TensorInfo]):
    """Concatenate one stride's tensors along channels, in `infos` order."""
    import torch

    xs = [features[t.name] for t in infos]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
