"""`film_up` (heads/film_up.py): logits at the image size, upsampled by learned convex weights or a
pixel shuffle; checked on weights with known outputs."""

import pytest
import torch

from refseg.core.feature_spec import FeatureSpec, TensorInfo
from refseg.heads import build_head
from refseg.heads.film_up import ConvexUpsampling, ShuffleUpsampling


def _spec():
    tensors = (TensorInfo("s8", "feature", 6, 8, 8, ()), TensorInfo("s16", "feature", 5, 16, 4, ()),
               TensorInfo("attn_s16", "attention", 4, 16, 4, ()))
    return FeatureSpec(image_size=64, token_length=4, text_dim=12, latent_channels=4, latent_stride=8,
                       tensors=tensors)


def test_convex_weights_on_the_centre_cell_give_the_nearest_upsampling():
    torch.manual_seed(0)
    up = ConvexUpsampling(hidden=3, factor=4)
    last = up.weights[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.zero_()
        last.bias[4 * 16:5 * 16] = 50.0  # neighbour 4 of the 3×3 is the cell itself
    x = torch.randn(2, 3, 5, 7)
    coarse = up.logits(x)
    expected = coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    assert torch.allclose(up(x), expected, atol=1e-5)
    # equal weights: each pixel of a cell is the mean of its 3×3 neighbours (zero outside the map)
    with torch.no_grad():
        last.bias.zero_()
    mean = torch.nn.functional.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=True)
    assert torch.allclose(up(x), mean.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3), atol=1e-5)


def test_shuffle_puts_each_channel_pair_on_its_pixel_of_the_cell():
    up = ShuffleUpsampling(hidden=3, factor=2)
    x = torch.randn(1, 3, 4, 4)
    conv = up.conv(x)  # (1, 8, 4, 4): class c, pixel (i, j) of a cell is channel c·4 + 2i + j
    out = up(x)
    assert out.shape == (1, 2, 8, 8)
    assert torch.equal(out[0, 1, 2 * 3 + 1, 2 * 2 + 0], conv[0, 1 * 4 + 2 * 1 + 0, 3, 2])


@pytest.mark.parametrize("upsample", ["convex", "shuffle"])
def test_film_up_draws_logits_at_the_image_size_and_starts_as_film_reads_the_sentence(upsample):
    spec = _spec()
    head = build_head("film_up", spec, hidden=8, upsample=upsample)
    assert head.head_args["upsample"] == upsample and head.uses_text
    features = {t.name: torch.randn(2, t.channels, 64 // t.stride, 64 // t.stride) for t in spec.tensors}
    text, mask = torch.randn(2, 4, 12), torch.ones(2, 4, dtype=torch.bool)
    assert head(features, text, mask).shape == (2, 2, 64, 64)
    with pytest.raises(ValueError, match="upsample takes convex or shuffle"):
        build_head("film_up", spec, hidden=8, upsample="bicubic")


def test_made_maps_are_coordinates_and_attention_summed_over_the_sentence_s_tokens():
    spec = _spec()
    head = build_head("film_up", spec, hidden=8, coords=True, attn_text=2)
    assert head.tensor_names == ["s16", "attn_s16", "s8"]  # the made maps are never read from the cache
    linear = head.token_weights[1]
    torch.nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([1.0, 2.0]))  # every valid token weighs 1 in map 0, 2 in map 1
    features = {t.name: torch.rand(2, t.channels, 64 // t.stride, 64 // t.stride) for t in spec.tensors}
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    made = head.made_maps(features, torch.randn(2, 4, 12), mask)
    assert set(made) == {"+text_attn_s16", "+coords_s16", "+coords_s8"}
    attn = features["attn_s16"]
    assert torch.allclose(made["+text_attn_s16"][0, 0], attn[0, :2].sum(0), atol=1e-6)  # padding weighs 0
    assert torch.allclose(made["+text_attn_s16"][1, 1], 2 * attn[1].sum(0), atol=1e-6)
    coords = made["+coords_s8"]
    assert coords.shape == (2, 2, 8, 8)
    assert torch.equal(coords[0, 0, 3], torch.linspace(-1, 1, 8)) and torch.equal(coords[0, 1, :, 5], torch.linspace(-1, 1, 8))
    out = head(features, torch.randn(2, 4, 12), mask)
    assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()
