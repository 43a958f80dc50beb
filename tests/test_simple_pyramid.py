"""Heads on a one-stride (diffusion transformer) spec: the `pyramid` head, and linear/vpd/film there."""

from __future__ import annotations

import json

import pytest
import torch

from refseg.core.feature_spec import FeatureSpec
from refseg.heads import build_head, evaluate, train

from _heads_util import IMAGE_SIZE, make_cache, spec as unet_spec

# FLUX's topology at toy size (2 double-stream, 4 single-stream blocks; 16-channel latents packed 2x2)
FLUX_LIKE = dict(num_layers=2, num_single_layers=4, num_attention_heads=2, attention_head_dim=4, in_channels=64,
                 joint_attention_dim=8)


def one_stride_spec(image_size=IMAGE_SIZE, **choices) -> FeatureSpec:
    return FeatureSpec.from_transformer(FLUX_LIKE, image_size, 6, **choices)


def features_for(spec, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(batch, *t.shape, generator=g) for t in spec.tensors}


def test_pyramid_levels_and_logits_follow_the_strides():
    spec = one_stride_spec()
    assert {t.stride for t in spec.tensors} == {16}
    head = build_head("pyramid", spec, hidden=12).eval()
    feats = features_for(spec)
    levels = head.pyramid(feats)
    assert [lv.shape[-1] for lv in levels] == [IMAGE_SIZE // 32, IMAGE_SIZE // 16, IMAGE_SIZE // 8]
    assert all(lv.shape[:2] == (2, 12) for lv in levels)
    assert head(feats).shape == (2, 2, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert head.tensor_names == spec.names and head.head_args["strides"] == [32, 16, 8]
    fine = build_head("pyramid", spec, hidden=12, strides=(32, 16, 8, 4)).eval()
    assert fine(feats).shape == (2, 2, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert isinstance(fine.rescale[-1], torch.nn.Sequential) and len(fine.rescale[-1]) == 4  # ViTDet's x4 branch
    # rebuilt from its recorded args: the same module, weight for weight
    again = build_head("pyramid", spec, **fine.head_args)
    assert again.load_state_dict(fine.state_dict()) is not None and again.strides == fine.strides


def test_pyramid_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="one stride.*strides 32, 16, 8"):
        build_head("pyramid", unet_spec())
    with pytest.raises(ValueError, match="rescales by 4, 2, 1 or 1/2 \\(got 0.25\\)"):
        build_head("pyramid", one_stride_spec(), strides=(64, 16))
    head = build_head("pyramid", unet_spec(), tensors=["s16", "attn_s16"], hidden=8)  # one stride of a UNet spec
    assert head.source_stride == 16 and head.tensor_names == ["s16", "attn_s16"]


@pytest.mark.parametrize("name", ["linear", "vpd", "film", "pyramid"])
def test_heads_run_on_a_one_stride_spec(name):
    spec = one_stride_spec()
    head = build_head(name, spec, **({} if name == "linear" else {"hidden": 8})).eval()
    text = torch.randn(2, spec.token_length, spec.text_dim)
    out = head(features_for(spec), text_embedding=text, text_mask=torch.ones(2, spec.token_length, dtype=torch.bool))
    stride = 8 if name == "pyramid" else 16
    assert out.shape == (2, 2, IMAGE_SIZE // stride, IMAGE_SIZE // stride)
    assert sorted(head.tensor_names) == sorted(spec.names)


def test_pyramid_trains_and_evaluates_from_a_one_stride_cache(tmp_path):
    spec = one_stride_spec(blocks=("d01", "x02"), attn_blocks=("x02",))
    make_cache(tmp_path / "train.zarr", 32, split="train", seed=0, the_spec=spec)
    val = make_cache(tmp_path / "val.zarr", 16, split="val", seed=1, the_spec=spec)
    torch.manual_seed(0)
    summary = train(str(tmp_path / "train.zarr"), 5, "pyramid", str(tmp_path / "run"),
                    val_cache=str(tmp_path / "val.zarr"), epochs=12, batch_size=8, lr=1e-2, optimizer="adam",
                    hidden=16, device="cpu", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["head"] == "pyramid" and config["head_args"]["strides"] == [32, 16, 8]
    metrics = evaluate(str(tmp_path / "run"), str(tmp_path / "val.zarr"), device="cpu")
    assert metrics["n"] == 16
    # the stride-16 features carry both rectangles (only the text says which): a head without text
    # learns where they are, which beats predicting everything as foreground by a clear margin
    everything = 100.0 * val["gt"].sum() / val["gt"].size
    assert metrics["oIoU"] > everything + 5.0, (everything, summary, metrics)
