"""Overlay PNGs: the image with the ground truth in green, the prediction in red (overlap yellow),
blended, and the sentence with its IoU as a caption underneath."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from refseg.core.transforms import load_image

GT_COLOUR = np.array([0, 255, 0], dtype=np.float32)
PRED_COLOUR = np.array([255, 0, 0], dtype=np.float32)
ALPHA = 0.45


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool mask resized (nearest) to PIL `size` = (W, H)."""
    if mask.shape[::-1] == size:
        return mask.astype(bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def overlay_image(image: Image.Image, pred: np.ndarray, gt: np.ndarray, caption: str) -> Image.Image:
    image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.float32).copy()
    g, p = _fit(gt, image.size), _fit(pred, image.size)
    for mask, colour in ((g, GT_COLOUR), (p, PRED_COLOUR)):
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colour
    body = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))

    font = ImageFont.load_default()
    chars = max(16, body.width // 7)
    lines = textwrap.wrap(caption, chars) or [""]
    line_h = 14
    out = Image.new("RGB", (body.width, body.height + line_h * len(lines) + 6), "white")
    out.paste(body, (0, 0))
    draw = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        draw.text((3, body.height + 3 + n * line_h), line, fill="black", font=font)
    return out


def draw_overlay(image_path, pred: np.ndarray, gt: np.ndarray, caption: str, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    overlay_image(load_image(image_path), pred, gt, caption).save(out_path)
    return out_path
