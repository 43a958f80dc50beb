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


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, by its real range.

    PIL's `convert("RGB")` clips wider types to 0..255, which turns most of a 16-bit picture white.
    So 16-bit grayscale (modes I;16*) is scaled from 0..65535 (÷257, rounded: the 8-bit file of the
    same picture, within one level); 32-bit integer (mode I, which is also how Pillow opens some 16-bit
    PNGs) likewise when a value exceeds 255, else taken as 8-bit; float (mode F) from 0..1 when its
    values lie there, else clipped to 0..255. Everything else (L, P, RGBA, CMYK, 16-bit RGB, which
    Pillow already reduces to 8 bits) is converted as PIL does.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            scale = 255.0 if peak <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0 if (image.mode.startswith("I;16") or peak > 255) else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # uint8: mode L
    return image.convert("RGB")  # L, P, CMYK, RGBA (alpha dropped), LA ...


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
