"""Image/mask transforms of the VPD protocol and the guarded image loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.core.errors import DataError
from refseg.core.transforms import image_to_tensor, load_image, mask_to_size


def _random_rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_image_to_tensor_squashes_bilinear_and_scales():
    img = _random_rgb(30, 50)
    x = image_to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = np.asarray(img.resize((16, 16), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_image_to_tensor_extremes_and_modes():
    white = image_to_tensor(Image.new("RGB", (7, 5), (255, 255, 255)), 8)
    black = image_to_tensor(Image.new("RGB", (7, 5), (0, 0, 0)), 8)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
    for mode, colour in (("L", 128), ("RGBA", (10, 20, 30, 0)), ("CMYK", (0, 0, 0, 0)), ("P", 3), ("I;16", 7)):
        x = image_to_tensor(Image.new(mode, (9, 6), colour), 4)
        assert x.shape == (3, 4, 4), mode
    rgba = image_to_tensor(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), 4)
    assert torch.allclose(rgba[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # alpha dropped


def test_mask_to_size_nearest():
    m = np.array([[True, False], [False, True]])
    out = mask_to_size(m, 4)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.kron(np.eye(2, dtype=np.uint8), np.ones((2, 2), np.uint8)))
    wide = np.zeros((2, 6), bool)
    wide[:, :3] = True
    out = mask_to_size(wide, 3)
    assert out.shape == (3, 3) and set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(out, [[1, 0, 0], [1, 0, 0], [1, 0, 0]])  # source columns 1, 3, 5
    with pytest.raises(ValueError):
        mask_to_size(np.zeros((2, 2, 1)), 4)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="image not found: .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="cannot read image .*junk.jpg"):
        load_image(junk)
    good = tmp_path / "good.jpg"
    _random_rgb(64, 64).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(DataError, match="cannot read image .*truncated.jpg"):
        load_image(truncated)
    assert load_image(good).size == (64, 64)


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="too large to decode safely"):
        load_image(path)


def test_large_jpeg_is_drafted_down(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1600), (200, 10, 10)).save(path, quality=90)
    img = load_image(path, target_size=64)
    assert img.size[0] < 2400 and min(img.size) >= 128  # never below 2x the target
    assert image_to_tensor(img, 64).shape == (3, 64, 64)
    assert load_image(path).size == (2400, 1600)
