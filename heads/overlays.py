"""Overlay PNGs that stay readable on any object colour: the ground truth as a white outline with a
black halo, the prediction as a cyan hatch with a cyan outline, a colour key, and the sentence with
its IoU wrapped underneath.

Why not coloured fills: the synthetic objects (and many real ones) are red, green or blue, and a
red or green fill vanishes on an object of its own colour. White-on-black lines show on every
colour, and a hatch leaves the object itself visible under the prediction.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from refseg.core.errors import RefsegError
from refseg.core.transforms import load_image, to_rgb8

GT_COLOUR = (255, 255, 255)  # outline, drawn over a black halo
HALO_COLOUR = (0, 0, 0)
PRED_COLOUR = (0, 255, 255)  # cyan: far from red, green, blue, yellow, purple and orange alike
HATCH_PERIOD = 6  # a diagonal hatch line every HATCH_PERIOD pixels, 2 pixels wide
LINE_H = 13
PAD = 3


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool mask resized (nearest) to PIL `size` = (W, H)."""
    if mask.shape[::-1] == size:
        return mask.astype(bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` dilated by `steps` pixels (4-neighbourhood)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's inner boundary, `width` pixels thick (pixels of the mask next to a pixel outside it)."""
    return mask & _grow(~mask, width)


def font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def wrap(text: str, width_px: int) -> list[str]:
    """`text` in lines that fit `width_px` pixels of the default font (textwrap, whole words)."""
    per_char = font().getlength("the big red circle") / len("the big red circle")
    return textwrap.wrap(text, max(8, int((width_px - 2 * PAD) / per_char))) or [""]


def paint(image: Image.Image, pred: np.ndarray, gt: np.ndarray) -> Image.Image:
    """The image with the prediction hatched and outlined in cyan and the GT outlined in white."""
    image = to_rgb8(image)
    rgb = np.asarray(image, dtype=np.uint8).copy()
    g, p = _fit(gt, image.size), _fit(pred, image.size)
    h, w = p.shape
    yy, xx = np.mgrid[0:h, 0:w]
    hatch = p & (((xx + yy) % HATCH_PERIOD) < 2)
    rgb[hatch | edge(p, 1)] = PRED_COLOUR
    thick = max(1, round(min(h, w) / 128))  # lines about 1 % of the side: visible, not covering small objects
    rgb[_grow(edge(g, thick), 1)] = HALO_COLOUR
    rgb[edge(g, thick)] = GT_COLOUR
    return Image.fromarray(rgb)


def legend(width: int, with_gt: bool = True) -> Image.Image:
    """The colour key, `width` pixels wide: a white-on-black outline for the GT (when there is one), a
    cyan hatch for the prediction (one entry per line when both do not fit on one)."""
    entries = (("ground truth", "gt"), ("prediction", "pred")) if with_gt else (("prediction", "pred"),)
    sizes = [LINE_H + 4 + int(font().getlength(label)) for label, _ in entries]
    one_row = PAD + sum(sizes) + 10 <= width
    rows = 1 if one_row else len(entries)
    strip = Image.new("RGB", (width, rows * (LINE_H + PAD) + PAD), "white")
    draw = ImageDraw.Draw(strip)
    x, y = PAD, PAD
    for (label, kind), size in zip(entries, sizes):
        box = (x, y, x + LINE_H - 1, y + LINE_H - 1)
        draw.rectangle(box, fill=(128, 128, 128))
        if kind == "gt":
            draw.rectangle(box, outline=HALO_COLOUR, width=3)
            draw.rectangle((box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), outline=GT_COLOUR, width=1)
        else:
            for k in range(0, LINE_H, HATCH_PERIOD // 2):  # diagonal hatch inside the box
                draw.line((box[0], box[1] + k, box[0] + k, box[1]), fill=PRED_COLOUR, width=1)
                draw.line((box[0] + k, box[3], box[2], box[1] + k), fill=PRED_COLOUR, width=1)
            draw.rectangle(box, outline=PRED_COLOUR, width=1)
        draw.text((x + LINE_H + 4, y), label, fill="black", font=font())
        if one_row:
            x += size + 10
        else:
            y += LINE_H + PAD
    return strip


def overlay_image(image: Image.Image, pred: np.ndarray, gt: np.ndarray | None, caption: str, *, scale: int = 1,
                  key: bool = True) -> Image.Image:
    """The painted image (enlarged `scale` times, nearest), the colour key when `key`, and the caption
    wrapped to the image's width underneath. `gt` None: no ground truth (refseg-predict), none in the key."""
    with_gt = gt is not None
    gt = np.zeros_like(pred) if gt is None else gt
    image = to_rgb8(image)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    body = paint(image, pred, gt)
    lines = wrap(caption, body.width)
    strip = legend(body.width, with_gt) if key else None
    top = strip.height if strip is not None else 0
    out = Image.new("RGB", (body.width, top + body.height + LINE_H * len(lines) + 2 * PAD), "white")
    if strip is not None:
        out.paste(strip, (0, 0))
    out.paste(body, (0, top))
    draw = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        draw.text((PAD, top + body.height + PAD + n * LINE_H), line, fill="black", font=font())
    return out


def draw_overlay(image_path, pred: np.ndarray, gt: np.ndarray, caption: str, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(overlay_image(load_image(image_path), pred, gt, caption), out_path)
    return out_path


class OverlayPicker:
    """Which samples `refseg-eval --overlays` draws, chosen while the evaluation streams past:
    the first K, the K of highest (`best`) or lowest (`worst`) IoU, or the given sent_ids.

    Only the chosen samples' masks are kept (at most K of them for best/worst, in a heap), so a
    large val set is not held in memory. Ties in IoU go to the lower sent_id, so the choice is
    deterministic.
    """

    def __init__(self, pick: str, k: int, sent_ids: tuple[int, ...] | None = None):
        self.pick, self.k, self.sent_ids = pick, k, sent_ids
        self._kept: list = []  # heap of (key, sent_id, iou, item) for best/worst; a list otherwise
        self._by_id: dict[int, tuple] = {}

    def offer(self, sent_id: int, iou: float, item) -> None:
        """Consider one sample; `item` is whatever the drawing needs (row, masks)."""
        if self.sent_ids is not None:
            if sent_id in self.sent_ids:
                self._by_id[sent_id] = (sent_id, iou, item)
        elif self.pick == "first":
            if len(self._kept) < self.k:
                self._kept.append((sent_id, iou, item))
        elif self.k > 0:
            # larger key = better kept; the heap's root is the weakest of those kept
            key = (iou if self.pick == "best" else -iou, -sent_id)
            entry = (key, sent_id, iou, item)
            if len(self._kept) < self.k:
                heapq.heappush(self._kept, entry)
            elif key > self._kept[0][0]:
                heapq.heapreplace(self._kept, entry)

    def chosen(self) -> list[tuple[int, float, object]]:
        """(sent_id, iou, item) in drawing order: given order, stream order, or best/worst first."""
        if self.sent_ids is not None:
            return [self._by_id[s] for s in self.sent_ids if s in self._by_id]
        if self.pick == "first":
            return list(self._kept)
        return [entry[1:] for entry in sorted(self._kept, key=lambda e: e[0], reverse=True)]


def save_png(image: Image.Image, path) -> None:
    """Write `image` as PNG at `path` atomically: a full disk leaves no 0-byte or half file, and is one
    line (the file, the cause)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # this process's own: two writers never share one
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException as exc:  # whatever stops the write (a full disk, Ctrl-C, an encoder error) leaves no part
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if not isinstance(exc, OSError):
            raise
        code = exc.errno or errno.EIO
        remedy = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix it"
        raise RefsegError(f"writing {path} failed: {os.strerror(code)} ({errno.errorcode.get(code, code)}); no part of "
                          f"it is left: {remedy} or choose another output, then run the command again") from None
