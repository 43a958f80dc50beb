"""The synthetic world's scenes: 2–5 coloured shapes drawn as the polygons their COCO annotations hold.

Each scene holds 2–5 shapes (`SHAPES`) in `COLOURS` and `SIZES` on a plain or lightly textured
background, rendered without antialiasing. Shapes are polygons (a circle has 32 vertices) and the
pixels are painted from the pycocotools rasterisation of those very polygons, so the COCO
segmentation matches the drawn pixels exactly (before JPEG compression). About 30% of the objects
are two overlapping polygons (refseg_core/synthetic.py's module doc says why). The sentences about
a scene and the dataset's files are synthetic.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from refseg.core.refer_files import decode_rle

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "big")

RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
# Object radius (centre to farthest vertex) as a share of the image side.
RADIUS = {"small": (0.07, 0.09), "big": (0.13, 0.16)}
SPLIT_PROBABILITY = 0.3  # share of objects annotated as two overlapping polygons
CIRCLE_VERTICES = 32



@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    center: tuple[float, float]
    radius: float
    polygons: list[list[float]]  # COCO polygons: flat [x0, y0, x1, y1, ...]; two when split
    bbox: list[float] = field(default_factory=list)  # COCO [x, y, w, h] of the drawn pixels
    area: float = 0.0  # drawn pixels (the union of the polygons)

    @property
    def x(self) -> float:
        return self.center[0]

    @property
    def y(self) -> float:
        return self.center[1]


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    size: int


# ---------------------------------------------------------------------------- geometry


def _shape_vertices(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(K, 2) polygon vertices of `shape` centred at (cx, cy) with circumradius r."""
    if shape == "circle":
        a = np.arange(CIRCLE_VERTICES) * (2 * np.pi / CIRCLE_VERTICES)
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "square":
        s = 0.8
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif shape == "triangle":
        a = np.pi / 2 + np.arange(3) * (2 * np.pi / 3)  # pointing up (y grows downwards)
        pts = np.stack([np.cos(a), -np.sin(a)], 1)
        pts[:, 1] += 0.2  # centre the triangle's height on cy
    elif shape == "diamond":
        pts = np.array([[0.0, -1.0], [0.75, 0.0], [0.0, 1.0], [-0.75, 0.0]])
    elif shape == "star":
        a = -np.pi / 2 + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([np.cos(a) * radii, np.sin(a) * radii], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return pts * r + np.array([cx, cy])


def _clip_x(pts: np.ndarray, x0: float, keep_left: bool) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon by the half-plane x <= x0 (or x >= x0)."""
    inside = (lambda p: p[0] <= x0) if keep_left else (lambda p: p[0] >= x0)
    out = []
    n = len(pts)
    for i in range(n):
        cur, nxt = pts[i], pts[(i + 1) % n]
        if inside(cur):
            out.append(cur)
        if inside(cur) != inside(nxt):
            t = (x0 - cur[0]) / (nxt[0] - cur[0])
            out.append(cur + t * (nxt - cur))
    return np.array(out)


def _flat(pts: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in pts.reshape(-1)]


def _rasterise(polygons: list[list[float]], size: int) -> np.ndarray:
    """Union of the polygons as pycocotools rasterises them: bool (size, size)."""
    rles = mask_utils.frPyObjects(polygons, size, size)
    return decode_rle(rles).any(axis=2)


# ---------------------------------------------------------------------------- scenes


def _place_objects(rng: np.random.Generator, image_size: int) -> list[SceneObject]:
    n = int(rng.integers(2, 6))
    # Few colours and shapes per scene, so look-alikes are common and the text must disambiguate.
    colours = rng.choice(len(COLOURS), size=int(rng.integers(1, 4)), replace=False)
    shapes = rng.choice(len(SHAPES), size=int(rng.integers(1, 4)), replace=False)
    objects: list[SceneObject] = []
    for _ in range(n):
        colour = COLOURS[int(rng.choice(colours))]
        shape = SHAPES[int(rng.choice(shapes))]
        size = SIZES[int(rng.integers(0, 2))]
        r = float(rng.uniform(*RADIUS[size])) * image_size
        split = bool(rng.random() < SPLIT_PROBABILITY)
        for _attempt in range(60):
            cx = float(rng.uniform(r + 1, image_size - r - 1))
            cy = float(rng.uniform(r + 1, image_size - r - 1))
            gap = 0.03 * image_size
            if all(np.hypot(cx - o.x, cy - o.y) > r + o.radius + gap for o in objects):
                break
        else:
            continue  # no room left: the scene gets fewer objects
        pts = _shape_vertices(shape, cx, cy, r)
        if split:
            band = 0.2 * r
            polygons = [_flat(_clip_x(pts, cx + band, True)), _flat(_clip_x(pts, cx - band, False))]
        else:
            polygons = [_flat(pts)]
        objects.append(SceneObject(colour, shape, size, (cx, cy), r, polygons))
    return objects


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    base = rng.integers(200, 246, size=3).astype(np.float32)
    img = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    if rng.random() < 0.5:  # lightly textured: a soft gradient and faint grain
        ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
        direction = rng.uniform(-8, 8, size=2).astype(np.float32)
        img += (ramp[None, :, None] * direction[0] + ramp[:, None, None] * direction[1])
        img += rng.normal(0.0, 2.5, size=img.shape).astype(np.float32)
    return img


def render_scene(rng: np.random.Generator, image_size: int = 128) -> Scene:
    """Draw one scene of 2–5 non-overlapping shapes (`Scene.image` is an RGB PIL image)."""
    objects: list[SceneObject] = []
    while len(objects) < 2:
        objects = _place_objects(rng, image_size)
    canvas = _background(rng, image_size)
    for obj in objects:
        drawn = _rasterise(obj.polygons, image_size)
        jitter = rng.integers(-12, 13, size=3)
        canvas[drawn] = np.clip(np.array(RGB[obj.colour]) + jitter, 0, 255)
        rle = mask_utils.encode(np.asfortranarray(drawn.astype(np.uint8)))
        obj.area = float(mask_utils.area(rle))
        obj.bbox = [float(v) for v in mask_utils.toBbox(rle)]
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    return Scene(image=image, objects=objects, size=image_size)
