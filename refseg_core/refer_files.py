"""Reading and checking a refer dataset's files (refseg_core/refer.py's module doc has the layout and rules).

`read_instances` reads instances.json, `read_refs` the refs file (through `safe_pickle`) and checks
each ref against instances.json, `check_segmentation` refuses broken segmentations and counts the
degenerate polygons (`PolygonReport`) that `usable_polygon` leaves out when a mask is rasterised.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from refseg.core.errors import DataError
from refseg.core.safe_pickle import safe_load

# pycocotools upsamples a polygon 5x into int32 pixel runs along its edges: a coordinate of 1e8
# overflows it (segfault), 1e7 takes gigabytes. Real annotations stay within a few image sizes.
MAX_COORDINATE = 1e6


@dataclass
class PolygonReport:
    """Polygons of the refs' annotations that are not rasterised as written (see the module docstring)."""

    path: str = "instances.json"
    skipped: int = 0  # fewer than 3 points, or a coordinate not finite or beyond ±MAX_COORDINATE
    trimmed: int = 0  # odd number of coordinates, 3 points or more: the dangling last one is ignored
    annotations: list[int] = field(default_factory=list)  # ids of the annotations holding any of them
    empty: list[int] = field(default_factory=list)  # ids of the annotations left with no polygon at all

    def __bool__(self) -> bool:
        return bool(self.skipped or self.trimmed or self.empty)

    def describe(self) -> str:
        """One line with the counts, for a warning or `refseg-data info`; "" when there is nothing."""
        changed = []
        if self.skipped:
            changed.append(f"{_count(self.skipped, 'degenerate polygon')} skipped when rasterising (fewer than "
                           f"3 points, or a coordinate not finite or beyond ±{int(MAX_COORDINATE):,})")
        if self.trimmed:
            changed.append(f"{_count(self.trimmed, 'odd-length polygon')} rasterised without its last number")
        parts = []
        if changed:
            parts.append(" and ".join(changed) + f", in {_count(len(self.annotations), 'annotation')} "
                         f"({_ids(self.annotations)})")
        if self.empty:
            whose = "its" if len(self.empty) == 1 else "their"
            parts.append(f"{_count(len(self.empty), 'annotation')} left with no polygon ({_ids(self.empty)}): "
                         f"the masks of {whose} refs are empty")
        return f"{self.path}: " + "; ".join(parts) if parts else ""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _ids(ids: list[int], shown: int = 5) -> str:
    listed = ", ".join(str(i) for i in ids[:shown]) + (", ..." if len(ids) > shown else "")
    return f"id {listed}" if len(ids) == 1 else f"ids {listed}"


def usable_polygon(polygon: list) -> list[float] | None:
    """A polygon as pycocotools rasterises it (a dangling odd number dropped), or None if it has no area.

    None for fewer than 3 points: pycocotools fills a 1- or 2-point polygon with nothing, and takes
    a 4-number one for a box when it comes first. None too for a coordinate that is not finite or
    beyond ±MAX_COORDINATE, which pycocotools cannot rasterise (segfault or gigabytes).
    """
    points = polygon[: len(polygon) // 2 * 2]
    if len(points) < 6 or not all(abs(v) <= MAX_COORDINATE for v in points):  # abs(nan) <= x is False
        return None
    return [float(v) for v in points]


def decode_rle(rle):
    """`pycocotools.mask.decode`, without the NumPy 2 DeprecationWarning it emits on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def _rle_string_counts(counts: str | bytes) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString), None if corrupt.

    Each run is a little-endian series of 5-bit groups stored as chr(48 + group), bit 0x20 meaning
    "more groups follow" and 0x10 in the last group the sign; from the third run on, a run is stored
    as the difference to the run two places before it.
    """
    try:
        data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        return None
    runs: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                return None  # the string ends inside a number
            c = data[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, dict]]:
    """instances.json's images, annotations and categories by id, each checked for what the reader uses."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"malformed JSON in {path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise DataError(f"malformed {path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"malformed {path}: '{key}' is missing or not a list")

    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict):
            raise DataError(f"malformed {where}: not an object")
        for key, ok, kind in (
            ("id", _is_int, "an integer"),
            ("file_name", lambda v: isinstance(v, str) and v != "", "a file name"),
            ("height", lambda v: _is_int(v) and v > 0, "a positive integer"),
            ("width", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ):
            if key not in img:
                raise DataError(f"malformed {where}: field '{key}' is missing")
            if not ok(img[key]):
                raise DataError(f"malformed {where}: field '{key}' must be {kind}, got {img[key]!r}")
        images[img["id"]] = img

    anns: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DataError(f"malformed {path}: annotations[{i}] has no integer 'id'")
        anns[ann["id"]] = ann

    categories = {}
    for cat in data.get("categories") or []:
        if isinstance(cat, dict) and _is_int(cat.get("id")):
            categories[cat["id"]] = cat
    return images, anns, categories


def read_refs(path: Path, text_field: str, images: dict[int, dict], anns: dict[int, dict], instances_path: Path,
              polygons: PolygonReport) -> list[dict]:
    """The refs file's list of refs, each checked (fields, unique ids, the image and annotation it names in
    instances.json, that annotation's segmentation: its degenerate polygons counted in `polygons`)."""
    refs = safe_load(path)
    if not isinstance(refs, list):
        raise DataError(f"malformed refs file {path}: expected a list of refs, got {type(refs).__name__}")
    seen_refs: set[int] = set()
    seen_sents: set[int] = set()
    checked_anns: set[int] = set()
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DataError(f"malformed refs file {path}: ref #{index} is a {type(ref).__name__}, not a dict")
        name = f"ref #{index}" + (f" (ref_id {ref['ref_id']})" if _is_int(ref.get("ref_id")) else "")
        _check_ref_fields(ref, name, path, text_field, seen_sents)
        ref_id = ref["ref_id"]
        if ref_id in seen_refs:
            raise DataError(f"malformed refs file {path}: ref_id {ref_id} appears twice (ref #{index})")
        seen_refs.add(ref_id)
        ann = _referred_annotation(ref, name, path, images, anns, instances_path)
        if ann["id"] not in checked_anns:  # several refs may share one annotation: count it once
            checked_anns.add(ann["id"])
            check_segmentation(ann, images[ann["image_id"]], instances_path, polygons)
    return refs


def _check_ref_fields(ref: dict, name: str, path: Path, text_field: str, seen_sents: set[int]) -> None:
    """Refuse a ref whose ids, split or sentences are missing or of the wrong type, or a repeated sent_id."""

    def bad(field: str, expected: str) -> DataError:
        if field not in ref:
            return DataError(f"malformed refs file {path}: {name} lacks field '{field}'")
        return DataError(
            f"malformed refs file {path}: {name} field '{field}' must be {expected}, got {ref[field]!r:.60}"
        )

    for key in ("ref_id", "ann_id", "image_id", "category_id"):
        if not _is_int(ref.get(key)):
            raise bad(key, "an integer")
    if not isinstance(ref.get("split"), str) or not ref["split"]:
        raise bad("split", "a split name")
    if not isinstance(ref.get("sentences"), list) or not ref["sentences"]:
        raise bad("sentences", "a non-empty list")
    for j, sent in enumerate(ref["sentences"]):
        if not isinstance(sent, dict):
            raise DataError(f"malformed refs file {path}: {name} sentence #{j} is not a dict")
        if not _is_int(sent.get("sent_id")):
            raise DataError(f"malformed refs file {path}: {name} sentence #{j} has no integer 'sent_id'")
        if not isinstance(sent.get(text_field), str):
            raise DataError(
                f"malformed refs file {path}: {name} sentence #{j} (sent_id {sent['sent_id']}) "
                f"has no text field '{text_field}'"
            )
        if sent["sent_id"] in seen_sents:
            raise DataError(f"malformed refs file {path}: {name} repeats sent_id {sent['sent_id']}")
        seen_sents.add(sent["sent_id"])


def _referred_annotation(ref: dict, name: str, path: Path, images: dict[int, dict], anns: dict[int, dict],
                         instances_path: Path) -> dict:
    """The annotation a ref names, refused unless it and the ref's image are in instances.json and agree."""
    if ref["image_id"] not in images:
        raise DataError(
            f"{name} in {path} refers to image_id {ref['image_id']}, which {instances_path} lacks"
        )
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise DataError(
            f"{name} in {path} refers to ann_id {ref['ann_id']}, which {instances_path} lacks"
        )
    if ann.get("image_id") != ref["image_id"]:
        raise DataError(
            f"{name} in {path}: annotation {ref['ann_id']} belongs to image {ann.get('image_id')!r}, "
            f"not to the ref's image {ref['image_id']}"
        )
    return ann


def check_segmentation(ann: dict, img: dict, instances_path: Path, polygons: PolygonReport) -> None:
    """Refuse malformed segmentations; count the degenerate polygons `mask` will skip in `polygons`.

    A polygon that is not a flat list of numbers, or a broken RLE, means a broken file and is
    refused. A polygon that is merely degenerate (too few points, odd length, absurd coordinates)
    is what real COCO holds now and then: counted, never a reason to refuse the dataset.
    """
    where = f"annotation {ann['id']} in {instances_path}"
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        check_rle(seg, img, where)
        return
    if not isinstance(seg, list):
        raise DataError(f"{where}: 'segmentation' must be a list of polygons or an RLE, got {seg!r:.60}")
    skipped = trimmed = usable = 0
    for k, part in enumerate(seg):
        if isinstance(part, dict):
            check_rle(part, img, f"{where} part #{k}")
            usable += 1
            continue
        if not isinstance(part, list) or not all(_is_number(v) for v in part):
            raise DataError(f"{where}: polygon #{k} is not a flat list of x, y numbers")
        if usable_polygon(part) is None:
            skipped += 1
        else:
            usable += 1
            trimmed += len(part) % 2
    if skipped or trimmed:
        polygons.skipped += skipped
        polygons.trimmed += trimmed
        polygons.annotations.append(ann["id"])
    if not usable:
        polygons.empty.append(ann["id"])

def check_rle(rle: dict, img: dict, where: str) -> None:
    """Refuse an RLE whose size is not the image's or whose counts do not cover it exactly."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise DataError(f"{where}: RLE 'size' must be [height, width], got {size!r:.40}")
    if list(size) != [img["height"], img["width"]]:
        raise DataError(
            f"{where}: RLE size {size} differs from the image's {img['height']}x{img['width']}"
        )
    if isinstance(counts, (str, bytes)):
        # pycocotools decodes a corrupt string into uninitialised memory rather than failing
        counts = _rle_string_counts(counts)
        if counts is None:
            raise DataError(f"{where}: compressed RLE 'counts' string is corrupt")
    elif not isinstance(counts, list):
        raise DataError(f"{where}: RLE 'counts' must be a list or a string")
    if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != size[0] * size[1]:
        raise DataError(f"{where}: RLE counts do not add up to height*width ({size[0]}x{size[1]})")
