"""Heads are built from the FeatureSpec: shapes, channel counts, VPD's structure, FiLM's identity start."""

import pytest
import torch
from _heads_util import spec as make_spec

from refseg.heads import HEADS, build_head, register_head
from refseg.core.feature_spec import FeatureSpec

SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
}
OTHER_UNET = {  # different channels, three levels
    "block_out_channels": (6, 10, 14),
    "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
    "layers_per_block": 1,
    "cross_attention_dim": 12,
}

SPECS = {
    "4 levels 64px": make_spec(64, strides=(8, 16, 32, 64), attn_strides=(16, 32)),
    "3 levels 32px": FeatureSpec.from_unet_config(OTHER_UNET, image_size=32, token_length=5, strides=(8, 16, 32),
                                                  attn_strides=(16,)),
}

READ_ORDER = {
    "4 levels 64px": ["s64", "s32", "attn_s32", "s16", "attn_s16", "s8"],
    "3 levels 32px": ["s32", "s16", "attn_s16", "s8"],
}


def _inputs(spec, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = {t.name: torch.randn(batch, *t.shape, generator=g) for t in spec.tensors}
    text = torch.randn(batch, spec.token_length, spec.text_dim, generator=g)
    mask = torch.zeros(batch, spec.token_length, dtype=torch.bool)
    mask[:, :3] = True
    return features, text, mask


def _args(name):
    return {} if name == "linear" else {"hidden": 16}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("head", ["vpd", "linear", "film", "film_attend"])
def test_output_shape_follows_the_spec(head, spec_name):
    spec = SPECS[spec_name]
    model = build_head(head, spec, **_args(head))
    features, text, mask = _inputs(spec)
    out = model(features, text, mask)
    finest = spec.image_size // 8
    assert out.shape == (3, 2, finest, finest)
    assert model.tensor_names == READ_ORDER[spec_name]  # coarsest first, attention after its stride's features
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if head == "linear":
        assert first.in_channels == sum(t.channels for t in spec.tensors)
    else:  # the two coarsest strides, with their attention maps
        strides = sorted({t.stride for t in spec.tensors}, reverse=True)[:2]
        assert first.in_channels == sum(t.channels for t in spec.tensors if t.stride in strides)


def test_vpd_matches_vpd_channels_on_sd15():
    # VPD's refer head on SD1.5 at 512 with A32 (L=40): SimpleDecoding over [320, 640+40, 1280+40, 1280]
    spec = FeatureSpec.from_unet_config(SD15_UNET, image_size=512, token_length=40)
    model = build_head("vpd", spec)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (2600, 640, (3, 3)), (640, 640, (3, 3)),
        (1320, 640, (3, 3)), (640, 640, (3, 3)),
        (960, 640, (3, 3)), (640, 640, (3, 3)),
        (640, 2, (1, 1)),
    ]
    assert all(c.bias is None for c in convs[:-1]) and convs[-1].bias is not None
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 6


def test_tensors_option_restricts_what_is_read():
    spec = SPECS["4 levels 64px"]
    model = build_head("vpd", spec, hidden=8, tensors=["s8", "s16", "s32"])
    assert model.tensor_names == ["s32", "s16", "s8"]
    features, _, _ = _inputs(spec)
    assert model({k: features[k] for k in ("s8", "s16", "s32")}).shape == (3, 2, 8, 8)
    single = build_head("vpd", spec, hidden=8, tensors=["s16"])
    assert single({"s16": features["s16"]}).shape == (3, 2, 4, 4)


def test_film_starts_as_vpd_and_ignores_padding_tokens():
    spec = SPECS["4 levels 64px"]
    torch.manual_seed(0)
    vpd = build_head("vpd", spec, hidden=16).eval()
    torch.manual_seed(0)
    film = build_head("film", spec, hidden=16).eval()
    features, text, mask = _inputs(spec)
    # gamma = 1, beta = 0 at initialisation: exactly the vpd decoder with the same weights
    assert torch.equal(film(features, text, mask), vpd(features))
    # once FiLM is trained, padding tokens (text_mask False) still change nothing
    torch.nn.init.normal_(film.film[-1].weight)
    before = film(features, text, mask)
    text2 = text.clone()
    text2[:, 3:] = 100.0
    assert torch.equal(film(features, text2, mask), before)
    text2[:, 1] += 1.0
    assert not torch.equal(film(features, text2, mask), before)
    with pytest.raises(ValueError, match="text_embedding"):
        film(features)


def test_registry_adds_a_head_in_one_class():
    @register_head("test-constant")
    class Constant(torch.nn.Module):
        uses_text = False

        def __init__(self, spec, *, value=1.0):
            super().__init__()
            self.tensor_names = [spec.features[-1].name]
            self.head_args = {"value": value}
            self.bias = torch.nn.Parameter(torch.tensor([0.0, value]))

        def forward(self, features, text_embedding=None, text_mask=None):
            x = features[self.tensor_names[0]]
            return self.bias.view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:])

    try:
        model = build_head("test-constant", SPECS["3 levels 32px"], value=2.0)
        assert model.head_name == "test-constant" and model.head_args == {"value": 2.0}
    finally:
        HEADS.pop("test-constant")
    with pytest.raises(ValueError, match="unknown head 'nope'.*film, film_attend, film_up, linear, pyramid, vpd"):
        build_head("nope", SPECS["3 levels 32px"])
