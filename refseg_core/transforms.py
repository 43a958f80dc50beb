"""Image and mask transforms of the VPD protocol (docs/DESIGN.md §5, §8).

Images are squashed (no aspect-preserving padding) to S×S with bilinear resampling and scaled to
[-1, 1]; ground-truth masks are squashed to S×S with nearest-neighbour resampling.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refseg.core.errors import DataError


def load_image(path: str | Path, target_size: int | None = None) -> Image.Image:
    """Open and fully decode an image; unreadable, truncated or bomb-sized files raise `DataError`.

    With `target_size`, a JPEG much larger than the target is decoded at a reduced scale (libjpeg's
    DCT scaling via `Image.draft`, never below 2×target), which bounds memory for huge photos.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between 1x and 2x its pixel limit; treat as fine.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            if target_size is not None and img.format == "JPEG":
                img.draft("RGB", (target_size * 2, target_size * 2))
            img.load()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"image path is a directory: {path}") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        # truncated files raise OSError("image file is truncated ..."), garbage UnidentifiedImageError
        raise DataError(f"cannot read image {path}: {exc}") from None
    return img


# Formats whose mode "I" holds 16-bit samples (0..65535): Pillow opens a 16-bit PGM/PPM as "I" (and a 16-bit
# PNG too, before Pillow 10), so a dark 16-bit picture (every value <= 255) must not be read as 8-bit.
SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})
_ROWS = 512  # rows converted at a time: a 10000-pixel-wide picture's temporaries stay a few MB


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, by its real range.

    PIL's `convert("RGB")` clips wider types to 0..255, which turns most of a 16-bit picture white.
    So 16-bit grayscale (modes I;16*, and mode I read from a 16-bit PNG or PGM) is scaled from 0..65535
    (÷257, rounded: the 8-bit file of the same picture, within one level). Other mode I pictures (32-bit
    TIFF) are taken as 8-bit when no value exceeds 255, as 16-bit when none exceeds 65535, else scaled by
    their own maximum. Float (mode F) is scaled from 0..1 when its finite values lie there, else clipped
    to 0..255; NaN is 0 and ±inf the ends of the range. Negative values are 0. Everything else (L, P,
    RGBA, CMYK, 16-bit RGB(A), which Pillow already reduces to 8 bits by their high byte) is converted as
    PIL does. Converted in strips of rows, so a huge picture needs no full-size wide temporaries.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image)  # uint16 / int32 / float32, not widened
        scale = _wide_scale(image, values)
        gray = np.empty(values.shape, np.uint8)
        for start in range(0, values.shape[0], _ROWS):
            block = values[start:start + _ROWS].astype(np.float32)  # one strip-sized buffer, worked in place
            if image.mode == "F":
                np.nan_to_num(block, copy=False, nan=0.0, posinf=np.inf, neginf=0.0)
            np.multiply(block, scale, out=block)
            np.clip(np.rint(block, out=block), 0, 255, out=block)
            gray[start:start + _ROWS] = block
        return Image.fromarray(gray).convert("RGB")  # uint8: mode L
    try:
        return image.convert("RGB")  # L, P, CMYK, RGBA (alpha dropped), LA ...
    except ValueError:  # a mode without a direct conversion (premultiplied La): through one with alpha
        for via in ("RGBA", "LA"):
            try:
                return image.convert(via).convert("RGB")
            except ValueError:
                continue
        raise DataError(f"cannot convert an image of mode {image.mode} to RGB") from None


def _wide_scale(image: Image.Image, values: np.ndarray) -> float:
    """The factor that maps a 16-bit, 32-bit or float picture's values to 0..255 (see `to_rgb8`)."""
    if image.mode == "F":
        peak = _finite_peak(values)
        return 255.0 if peak <= 1.0 else 1.0
    if image.mode.startswith("I;16") or image.format in SIXTEEN_BIT_I_FORMATS:
        return 1.0 / 257.0
    peak = float(values.max()) if values.size else 0.0
    if peak <= 255:
        return 1.0
    return 1.0 / 257.0 if peak <= 65535 else 255.0 / peak


def _finite_peak(values: np.ndarray) -> float:
    """The largest finite value (0 when there is none), strip by strip."""
    peak = 0.0
    for start in range(0, values.shape[0], _ROWS):
        block = values[start:start + _ROWS]
        finite = block[np.isfinite(block)]
        if finite.size:
            peak = max(peak, float(finite.max()))
    return peak


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image (any mode) → float32 tensor (3, size, size) in [-1, 1], squashed bilinearly."""
    image = to_rgb8(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).div_(127.5).sub_(1.0)


def mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool/0-1 mask (H, W) → uint8 (size, size) of 0/1, nearest-neighbour squash."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    pil = Image.fromarray((mask != 0).astype(np.uint8))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.NEAREST)
    return np.asarray(pil, dtype=np.uint8).copy()
