"""A spec's tensors grouped by stride: how the built-in heads read multi-scale features."""

from __future__ import annotations

from collections import defaultdict

import torch

from refseg.core.feature_spec import FeatureSpec, TensorInfo


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


def concat_level(features: dict, infos: list[TensorInfo]) -> torch.Tensor:
    """Concatenate one stride's tensors along channels, in `infos` order."""
    xs = [features[t.name] for t in infos]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
