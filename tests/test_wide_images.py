"""Images wider than 8 bits (issue 23): 16-bit and float pictures are scaled to 8 bits by their range,
never clipped, so a 16-bit file gives the input of its 8-bit version within one level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.core.transforms import image_to_tensor, load_image, to_rgb8

ONE_LEVEL = 1 / 127.5 + 1e-6  # one 8-bit step in image_to_tensor's [-1, 1]


def gradient(h=48, w=64) -> np.ndarray:
    """A smooth 16-bit picture spanning the whole range (a dark corner, a bright one)."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x / (w - 1) * 0.7 + y / (h - 1) * 0.3) * 65535).astype(np.uint16)


@pytest.mark.parametrize("write", ["png-I;16", "tiff-I", "tiff-I;16", "tiff-F", "tiff-F-0..255"])
def test_a_wide_image_gives_its_8_bit_versions_input(tmp_path, write):
    wide = gradient()
    eight = np.rint(wide / 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    kind, mode = write.split("-", 1)
    path = tmp_path / f"wide.{kind}"
    if mode == "I;16":
        Image.fromarray(wide).save(path)
    elif mode == "I":
        Image.fromarray(wide.astype(np.int32)).save(path)
    elif mode == "F":
        Image.fromarray((wide / 65535).astype(np.float32)).save(path)
    else:  # float already on the 8-bit scale
        Image.fromarray((wide / 257).astype(np.float32)).save(path)
    opened = load_image(path)
    assert opened.mode != "RGB"  # a wide mode reached the conversion
    x16, x8 = image_to_tensor(opened, 32), image_to_tensor(load_image(tmp_path / "eight.png"), 32)
    assert torch.abs(x16 - x8).max() <= ONE_LEVEL, write
    assert (x16 > 0.99).float().mean() < 0.05  # not clipped to white (convert("RGB") made 99.6% white)


def test_plain_8_bit_modes_convert_as_pil_does():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for image in (rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("CMYK")):
        assert np.array_equal(np.asarray(to_rgb8(image)), np.asarray(image.convert("RGB"))), image.mode
    assert to_rgb8(rgb) is rgb
    small = Image.fromarray(np.full((4, 4), 200, np.int32))  # an 8-bit picture held as mode I
    assert np.asarray(to_rgb8(small))[0, 0].tolist() == [200, 200, 200]
