"""FeatureSpec: VPD's layout from the SD1.5 config, serialisation, and errors for impossible strides."""

import pytest

from refseg.core.feature_spec import FeatureSpec

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "in_channels": 4,
}


def test_sd15_spec_is_vpds_layout():
    spec = FeatureSpec.from_unet_config(SD15_UNET, image_size=512, token_length=40)
    got = {t.name: (t.channels, t.size) for t in spec.tensors}
    assert got == {"s8": (320, 64), "s16": (640, 32), "s32": (1280, 16), "s64": (1280, 8),
                   "attn_s16": (40, 32), "attn_s32": (40, 16)}
    assert spec["s64"].modules == ("up_blocks.0.resnets.1",)
    assert spec["s32"].modules == ("up_blocks.1.attentions.1",)
    assert spec["s8"].modules == ("up_blocks.3",)
    # VPD's "A32": 5 attn2 layers at each of strides 32 and 16 (2 down + 3 up).
    assert len(spec["attn_s32"].modules) == 5 and len(spec["attn_s16"].modules) == 5
    assert "down_blocks.2.attentions.1.transformer_blocks.0.attn2" in spec["attn_s32"].modules
    assert "up_blocks.2.attentions.2.transformer_blocks.0.attn2" in spec["attn_s16"].modules
    assert [t.name for t in spec.features] == ["s64", "s32", "s16", "s8"]
    assert spec.text_dim == 768 and spec.latent_size == 64
    # float16: 320*64² + 640*32² + 1280*16² + 1280*8² features + 40*(32²+16²) attention, 2 bytes each
    assert spec.bytes_per_sample() == 2 * (320 * 4096 + 640 * 1024 + 1280 * 256 + 1280 * 64 + 40 * (1024 + 256))


def test_round_trip_and_select():
    spec = FeatureSpec.from_unet_config(SD15_UNET, image_size=256, token_length=77, strides=(8, 16), attn_strides=(8,))
    again = FeatureSpec.from_dict(spec.to_dict())
    assert again == spec
    assert spec.names == ["s8", "s16", "attn_s8"]
    assert len(spec["attn_s8"].modules) == 5  # down_blocks.0 (2) + up_blocks.3 (3)
    sub = spec.select(["s16"])
    assert sub.names == ["s16"] and sub.image_size == 256
    with pytest.raises(KeyError, match="s64"):
        spec.select(["s64"])


def test_impossible_strides_are_refused():
    with pytest.raises(ValueError, match="stride 128"):
        FeatureSpec.from_unet_config(SD15_UNET, image_size=512, strides=(128,))
    with pytest.raises(ValueError, match="cross-attention.*64"):
        FeatureSpec.from_unet_config(SD15_UNET, image_size=512, attn_strides=(64,))
