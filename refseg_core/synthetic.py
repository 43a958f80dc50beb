"""A synthetic RefCOCO-format world: coloured shapes, and sentences that need the text to pick one.

Each scene holds 2–5 shapes (`SHAPES`) in `COLOURS` and `SIZES` on a plain or lightly textured
background, rendered without antialiasing. Shapes are polygons (a circle has 32 vertices) and the
pixels are painted from the pycocotools rasterisation of those very polygons, so the COCO
segmentation matches the drawn pixels exactly (before JPEG compression). Drawing a scene is
`refseg.core.synthetic_scenes`'; this module writes the sentences and the dataset's files.

About 30% of the objects are annotated as **two overlapping polygons** (the shape cut vertically
into a left and a right part that share a band in the middle), as real COCO objects made of several
polygons are. Those are the annotations whose ``segmentation`` holds two polygons: there the `vpd`
mask rule (per-polygon sum == 1) drops the shared band while the `union` rule keeps it, so the two
rules differ on them and agree everywhere else. Distinct objects never overlap each other.

Referred objects get 1–3 sentences, each checked to identify exactly one object of its scene:
attributes ("the big red circle"), position among look-alikes ("the square on the left"), or a
relation to another uniquely named object ("the star next to the blue circle", "the red one above
the green square"). Every word used is in `VOCABULARY`.

Output (docs/DESIGN.md §3): ``<out>/refcoco-synth/{instances.json, refs(unc).p, images/*.jpg}``, splits
train/val/testA/testB by image (≈70/10/10/10%). The same seed gives the same bytes in every file;
image i depends only on (seed, i), so a smaller set is a prefix of a larger one (splits aside).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from refseg.core.synthetic_scenes import COLOURS, SHAPES, SIZES, Scene, SceneObject, render_scene

POSITIONS = ("left", "right", "top", "bottom", "middle")

# Every word a synthetic sentence (`sent`, `raw`) or caption (`describe_scene`) can contain.
VOCABULARY = tuple(sorted(set(COLOURS + SHAPES + SIZES + POSITIONS + (
    "a", "above", "and", "at", "below", "in", "next", "of", "on", "one", "shape", "the", "to",
))))

DATASET_NAME = "refcoco-synth"
SPLIT_BY = "unc"

# ---------------------------------------------------------------------------- language


def _position_phrase(obj: SceneObject, image_size: int) -> str:
    col = ("left", "middle", "right")[min(2, int(3 * obj.x / image_size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * obj.y / image_size))]
    if row == "middle" and col == "middle":
        return "in the middle"
    if row == "middle":
        return f"on the {col}"
    if col == "middle":
        return f"at the {row}"
    return f"at the {row} {col}"


def describe_scene(scene: Scene) -> str:
    """Caption naming every object (size, colour, shape, position), left to right."""
    parts = [
        f"a {o.size} {o.colour} {o.shape} {_position_phrase(o, scene.size)}"
        for o in sorted(scene.objects, key=lambda o: (o.x, o.y))
    ]
    return " and ".join(parts)


# A descriptor names some of (size, colour, shape); "one"/"shape" stands in for a missing shape.
_DESCRIPTORS = (
    ("colour", "shape"),
    ("shape",),
    ("colour",),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("size", "colour"),
    ("size",),
    (),
)


def _matches(desc: tuple[str, ...], target: SceneObject, other: SceneObject) -> bool:
    return all(getattr(other, attr) == getattr(target, attr) for attr in desc)


def _phrase(desc: tuple[str, ...], obj: SceneObject) -> str:
    words = [getattr(obj, attr) for attr in ("size", "colour") if attr in desc]
    if "shape" in desc:
        words.append(obj.shape)
    else:
        words.append("one" if words else "shape")
    return "the " + " ".join(words)


def _unique_descriptors(obj: SceneObject, objects: list[SceneObject]) -> list[tuple[str, ...]]:
    return [
        d for d in _DESCRIPTORS
        if d and not any(_matches(d, obj, o) for o in objects if o is not obj)
    ]


SENTENCE_KINDS = ("attribute", "position", "relation")
RELATION_PHRASES = ("next to", "above", "below", "to the left of", "to the right of")
POSITION_ENDINGS = ("on the left", "on the right", "at the top", "at the bottom")


def sentence_kind(sentence: str) -> str:
    """Which of `SENTENCE_KINDS` a referring sentence of this world is, read from its words: a relation
    names an anchor ("... above the green square"), a position ends "on the left" / "at the top" ...,
    an attribute sentence is the object's own words only. Exact for `_candidate_sentences`' templates."""
    padded = f" {sentence.strip()} "
    if any(f" {phrase} " in padded for phrase in RELATION_PHRASES):
        return "relation"
    if sentence.strip().endswith(POSITION_ENDINGS):
        return "position"
    return "attribute"


def _candidate_sentences(target: SceneObject, scene: Scene) -> dict[str, list[str]]:
    """Sentences that identify `target` and nothing else in the scene, grouped by kind."""
    objects, size = scene.objects, scene.size
    margin = 0.1 * size
    out: dict[str, list[str]] = {"attribute": [], "position": [], "relation": []}

    for d in _unique_descriptors(target, objects):
        out["attribute"].append(_phrase(d, target))

    # Position among look-alikes: the target is the extreme one, by a clear margin.
    axes = (("on the left", 0, -1), ("on the right", 0, 1), ("at the top", 1, -1), ("at the bottom", 1, 1))
    for d in _DESCRIPTORS:
        group = [o for o in objects if _matches(d, target, o)]
        if len(group) < 2:
            continue
        for words, axis, sign in axes:
            key = lambda o: sign * o.center[axis]  # noqa: E731
            if all(key(target) - key(o) >= margin for o in group if o is not target):
                out["position"].append(f"{_phrase(d, target)} {words}")

    # Relations to an anchor that its own words pick out uniquely.
    for anchor in objects:
        if anchor is target:
            continue
        anchor_descs = _unique_descriptors(anchor, objects)
        if not anchor_descs:
            continue
        anchor_words = _phrase(anchor_descs[0], anchor)
        dist = lambda o: float(np.hypot(o.x - anchor.x, o.y - anchor.y))  # noqa: E731
        nearest_overall = min((o for o in objects if o is not anchor), key=dist)
        for d in _DESCRIPTORS:
            group = [o for o in objects if o is not anchor and _matches(d, target, o)]
            others = [o for o in group if o is not target]
            # "next to": the target is the nearest of its look-alikes, clearly, and really is close.
            near_ok = (all(dist(target) <= 0.7 * dist(o) for o in others)
                       if others else nearest_overall is target)
            if near_ok and dist(target) <= 0.45 * size:
                out["relation"].append(f"{_phrase(d, target)} next to {anchor_words}")
            for words, axis, sign in (("above", 1, -1), ("below", 1, 1),
                                      ("to the left of", 0, -1), ("to the right of", 0, 1)):
                cross = 1 - axis

                def loosely(o):  # on that side at all, roughly in line
                    return sign * (o.center[axis] - anchor.center[axis]) > 0 and \
                        abs(o.center[cross] - anchor.center[cross]) < 0.4 * size

                def clearly(o):
                    return sign * (o.center[axis] - anchor.center[axis]) >= margin + target.radius and \
                        abs(o.center[cross] - anchor.center[cross]) < 0.25 * size

                if clearly(target) and not any(loosely(o) for o in others):
                    out["relation"].append(f"{_phrase(d, target)} {words} {anchor_words}")
    for kind in out:
        out[kind] = list(dict.fromkeys(out[kind]))  # dedupe, keep order
    return out


def _choose_sentences(rng: np.random.Generator, candidates: dict[str, list[str]]) -> list[str]:
    """1–3 sentences, drawn round-robin from the kinds available so they differ in style."""
    pools = {k: list(v) for k, v in candidates.items() if v}
    if not pools:
        return []
    wanted = int(rng.integers(1, 4))
    kinds = sorted(pools)
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    chosen: list[str] = []
    while len(chosen) < wanted and any(pools.values()):
        for kind in order:
            if pools[kind] and len(chosen) < wanted:
                chosen.append(pools[kind].pop(int(rng.integers(0, len(pools[kind])))))
    return chosen


def refer_scene(rng: np.random.Generator, scene: Scene) -> list[tuple[int, list[str]]]:
    """Pick the referred objects of a scene: [(object index, sentences)], at least one."""
    referable = []
    for i, obj in enumerate(scene.objects):
        sentences = _choose_sentences(rng, _candidate_sentences(obj, scene))
        if sentences:
            referable.append((i, sentences))
    if not referable:
        return []
    k = int(rng.integers(min(2, len(referable)), len(referable) + 1))
    keep = sorted(rng.choice(len(referable), size=k, replace=False).tolist())
    return [referable[j] for j in keep]


# ---------------------------------------------------------------------------- dataset


def _split_names(n_images: int, rng: np.random.Generator) -> list[str]:
    """Split of each image: ≈70/10/10/10 train/val/testA/testB, each non-empty when n >= 8."""
    if n_images >= 8:
        k = max(1, round(0.1 * n_images))
        names = ["val"] * k + ["testA"] * k + ["testB"] * k
        names += ["train"] * (n_images - len(names))
    else:
        names = (["train", "val", "testA", "testB"] + ["train"] * 4)[:n_images]
    return [names[i] for i in rng.permutation(n_images)]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def existing_dataset(out_root: str | Path) -> str | None:
    """What a dataset already in ``out_root/refcoco-synth`` holds ("40 images, 57 refs"), or None.

    A folder with images but neither refs nor instances file is a `generate` that was interrupted
    (those files are written last): nothing anyone could use, so None.
    """
    root = Path(out_root) / DATASET_NAME
    files = [root / "instances.json", root / f"refs({SPLIT_BY}).p"]
    if not any(f.exists() for f in files):
        return None
    n_images = len(list((root / "images").glob("*"))) if (root / "images").is_dir() else 0
    return f"{n_images} image files, {' and '.join(f.name for f in files if f.exists())}"


def generate(out_root: str | Path, images: int = 200, seed: int = 0, image_size: int = 128) -> Path:
    """Write the synthetic dataset under ``out_root/refcoco-synth``; returns that folder.

    A dataset already there is replaced (the command asks for --overwrite first: `existing_dataset`).
    """
    if images < 1:
        raise ValueError("images must be at least 1")
    if image_size < 32:
        raise ValueError("image_size must be at least 32")
    if seed < 0:
        raise ValueError("seed must be 0 or more")
    root = Path(out_root) / DATASET_NAME
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    splits = _split_names(images, np.random.default_rng([seed, 2**31]))
    coco_images, annotations, refs = [], [], []
    n_sentences = 0
    for index in range(images):
        image_id = index + 1
        scene, referred = _referred_scene(np.random.default_rng([seed, index]), image_size)
        file_name = f"synth_{image_id:06d}.jpg"
        _write_if_changed(image_dir / file_name, _jpeg_bytes(scene.image))
        coco_images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        new_annotations = _annotations(scene, image_id, first_ann_id=len(annotations) + 1)
        new_refs = _refs(scene, referred, image_id, [a["id"] for a in new_annotations], splits[index],
                         first_ref_id=len(refs), first_sent_id=n_sentences)
        annotations += new_annotations
        refs += new_refs
        n_sentences += sum(len(r["sent_ids"]) for r in new_refs)

    # A smaller re-run into the same folder must not leave images of the larger one behind.
    wanted = {img["file_name"] for img in coco_images}
    for stale in image_dir.glob("synth_*.jpg"):
        if stale.name not in wanted:
            stale.unlink()
    instances = {
        "info": {
            "description": "refseg synthetic shapes (annotations with two polygons overlap in a band)",
            "seed": seed,
            "image_size": image_size,
        },
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
    }
    _write_atomic(root / "instances.json", json.dumps(instances, separators=(",", ":")).encode())
    _write_atomic(root / f"refs({SPLIT_BY}).p", pickle.dumps(refs, protocol=2))
    return root


def _referred_scene(rng: np.random.Generator, image_size: int) -> tuple[Scene, list[tuple[int, list[str]]]]:
    """A scene and its referred objects, redrawn (from the same generator) until one can be referred to."""
    while True:
        scene = render_scene(rng, image_size)
        referred = refer_scene(rng, scene)
        if referred:
            return scene, referred


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        _write_atomic(path, data)


def _annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    """One COCO annotation per object of the scene, numbered from `first_ann_id`."""
    return [{
        "id": first_ann_id + k,
        "image_id": image_id,
        "category_id": SHAPES.index(obj.shape) + 1,
        "segmentation": obj.polygons,
        "area": obj.area,
        "bbox": obj.bbox,
        "iscrowd": 0,
    } for k, obj in enumerate(scene.objects)]


def _refs(scene: Scene, referred, image_id: int, ann_ids: list[int], split: str, first_ref_id: int,
          first_sent_id: int) -> list[dict]:
    """One RefCOCO ref per referred object, with its sentences; ids numbered on from the given firsts."""
    refs, sent_id = [], first_sent_id
    for obj_index, sentences in referred:
        obj = scene.objects[obj_index]
        sents = []
        for text in sentences:
            sents.append({"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()})
            sent_id += 1
        refs.append({
            "ref_id": first_ref_id + len(refs),
            "ann_id": ann_ids[obj_index],
            "image_id": image_id,
            "category_id": SHAPES.index(obj.shape) + 1,
            "split": split,
            "sent_ids": [s["sent_id"] for s in sents],
            "sentences": sents,
            # like the real files: image name + ann id; no such file exists, readers ignore it
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_ids[obj_index]}.jpg",
        })
    return refs


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()
