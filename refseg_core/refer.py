"""RefCOCO / RefCOCO+ / RefCOCOg reader, in the manner of the `refer` API (docs/DESIGN.md §3).

Layout::

    <data_root>/<dataset>/refs(<split_by>).p    pickled list of refs (read with `safe_pickle`)
    <data_root>/<dataset>/instances.json        COCO images + annotations of those refs
    images: image_root, else <data_root>/<dataset>/images/ if it exists (the synthetic set),
            else <data_root>/images/mscoco/images/train2014/

One sample is one sentence of one ref. Image file names come from instances.json; the ref's own
`file_name` (``COCO_train2014_..._<ann_id>.jpg``) names no real file and is ignored.

Masks follow `refer.getMask` + LAVT/VPD: each polygon of the annotation is rasterised by
pycocotools at the original size, the per-polygon masks are summed and pixels equal to 1 are the
object (rule ``vpd``), so where two polygons of one annotation overlap the pixels are background.
Rule ``union`` keeps any pixel covered by a polygon. Crowd annotations are RLE (counts a list =
uncompressed, or a string = compressed) and give the same mask under both rules.

Degenerate polygons (fewer than 3 points, an empty list, a coordinate that is not finite or lies
beyond ±1e6) are skipped when rasterising: pycocotools gives a 1- or 2-point polygon no pixels, so
the mask is `refer.getMask`'s, byte for byte, wherever refer.getMask gives one (it fails when such a
polygon comes first, taking a 4-number one for a box). An odd-length polygon loses its dangling
last number, as pycocotools does. An annotation left with no polygon has an empty mask and its refs
stay (the split keeps its sentences; an empty prediction scores IoU 0 on it, as LAVT counts U = 0).
They are counted once per dataset (`ReferDataset.polygons`, a `DegeneratePolygonWarning`), never a
reason to refuse the dataset.

Splits are selected as `refer.getRefIds` does: ``testA``/``testB``/``testC`` take every ref whose
split contains the letter (a ``testAB`` ref is in testA and testB), ``test`` every split containing
``test``, any other name (train, val, testAB, ...) the refs whose split equals it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from refseg.core.errors import DataError, RefsegError
from refseg.core.safe_pickle import safe_load

MASK_RULES = ("vpd", "union")
# pycocotools upsamples a polygon 5x into int32 pixel runs along its edges: a coordinate of 1e8
# overflows it (segfault), 1e7 takes gigabytes. Real annotations stay within a few image sizes.
MAX_COORDINATE = 1e6
TEXT_FIELDS = ("sent", "raw")
# Order used when listing splits; anything else follows alphabetically.
_SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")
_LETTER_SPLITS = ("testA", "testB", "testC")  # refer.getRefIds selects these by their last letter


@dataclass(frozen=True)
class Sample:
    """One sentence of one ref: the unit of extraction and evaluation."""

    sent_id: int
    ref_id: int
    ann_id: int
    image_id: int
    image_path: Path
    sentence: str
    category_id: int


class DegeneratePolygonWarning(UserWarning):
    """Some polygons of a dataset's annotations give no area and are skipped (said once per dataset)."""


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


def in_split(split: str, ref_split: str) -> bool:
    """Whether a ref whose split is `ref_split` belongs to the requested `split`, as in `refer.getRefIds`.

    testA/testB/testC: the letter is in the ref's split (refer.py: "we also consider testAB,
    testBC, ..."), so a testAB ref is in testA and in testB; test: "test" is in it; any other
    name (train, val, testAB, testBC, testAC, ...): equal.
    """
    if split in _LETTER_SPLITS:
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _split_sort_key(name: str):
    return (_SPLIT_ORDER.index(name), "") if name in _SPLIT_ORDER else (len(_SPLIT_ORDER), name)


class ReferDataset:
    """The refs of one dataset/split_by, their COCO annotations and image locations.

    ``ReferDataset(data_root, "refcoco", "unc").samples("testA")`` gives one `Sample` per sentence;
    ``.mask(ref_id)`` gives the ground truth as a bool (H, W) array at the image's original size.
    Everything is read and checked on construction, so a malformed file fails here, naming itself.
    """

    def __init__(
        self,
        data_root: str | Path,
        dataset: str,
        split_by: str = "unc",
        image_root: str | Path | None = None,
        text_field: str = "sent",
    ):
        if text_field not in TEXT_FIELDS:
            raise RefsegError(f"unknown text field {text_field!r}; choose one of: {', '.join(TEXT_FIELDS)}")
        self.data_root = Path(data_root)
        self.dataset = dataset
        self.split_by = split_by
        self.text_field = text_field

        if not self.data_root.is_dir():
            raise DataError(f"data root not found: {self.data_root}")
        self.dataset_dir = self.data_root / dataset
        if not self.dataset_dir.is_dir():
            present = sorted(p.name for p in self.data_root.iterdir() if p.is_dir())
            raise DataError(
                f"dataset folder not found: {self.dataset_dir} "
                f"(folders in {self.data_root}: {', '.join(present) or 'none'})"
            )
        self.refs_path = self.dataset_dir / f"refs({split_by}).p"
        self.instances_path = self.dataset_dir / "instances.json"
        if not self.refs_path.is_file():
            present = sorted(p.name for p in self.dataset_dir.glob("refs(*).p"))
            raise DataError(
                f"refs file not found: {self.refs_path} "
                f"(refs files in {self.dataset_dir}: {', '.join(present) or 'none'})"
            )
        if not self.instances_path.is_file():
            raise DataError(f"instances file not found: {self.instances_path}")

        if image_root is not None:
            self.image_root = Path(image_root)
        elif (self.dataset_dir / "images").is_dir():
            self.image_root = self.dataset_dir / "images"
        else:
            self.image_root = self.data_root / "images" / "mscoco" / "images" / "train2014"

        self._images, self._anns, self._categories = self._read_instances()
        self.polygons = PolygonReport(path=str(self.instances_path))
        self._refs = self._read_refs()
        self._refs_by_id = {ref["ref_id"]: ref for ref in self._refs}
        if self.polygons:
            # once per dataset, here rather than per mask: a split can hold thousands of sentences
            warnings.warn(self.polygons.describe(), DegeneratePolygonWarning, stacklevel=2)

    # ------------------------------------------------------------------ reading and checking

    def _read_instances(self):
        path = self.instances_path
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
            for field, ok, kind in (
                ("id", _is_int, "an integer"),
                ("file_name", lambda v: isinstance(v, str) and v != "", "a file name"),
                ("height", lambda v: _is_int(v) and v > 0, "a positive integer"),
                ("width", lambda v: _is_int(v) and v > 0, "a positive integer"),
            ):
                if field not in img:
                    raise DataError(f"malformed {where}: field '{field}' is missing")
                if not ok(img[field]):
                    raise DataError(f"malformed {where}: field '{field}' must be {kind}, got {img[field]!r}")
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

    def _read_refs(self) -> list[dict]:
        path = self.refs_path
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

            def bad(field: str, expected: str) -> DataError:
                if field not in ref:
                    return DataError(f"malformed refs file {path}: {name} lacks field '{field}'")
                return DataError(
                    f"malformed refs file {path}: {name} field '{field}' must be {expected}, got {ref[field]!r:.60}"
                )

            for field in ("ref_id", "ann_id", "image_id", "category_id"):
                if not _is_int(ref.get(field)):
                    raise bad(field, "an integer")
            if not isinstance(ref.get("split"), str) or not ref["split"]:
                raise bad("split", "a split name")
            if not isinstance(ref.get("sentences"), list) or not ref["sentences"]:
                raise bad("sentences", "a non-empty list")
            for j, sent in enumerate(ref["sentences"]):
                if not isinstance(sent, dict):
                    raise DataError(f"malformed refs file {path}: {name} sentence #{j} is not a dict")
                if not _is_int(sent.get("sent_id")):
                    raise DataError(f"malformed refs file {path}: {name} sentence #{j} has no integer 'sent_id'")
                if not isinstance(sent.get(self.text_field), str):
                    raise DataError(
                        f"malformed refs file {path}: {name} sentence #{j} (sent_id {sent['sent_id']}) "
                        f"has no text field '{self.text_field}'"
                    )
                if sent["sent_id"] in seen_sents:
                    raise DataError(f"malformed refs file {path}: {name} repeats sent_id {sent['sent_id']}")
                seen_sents.add(sent["sent_id"])

            ref_id = ref["ref_id"]
            if ref_id in seen_refs:
                raise DataError(f"malformed refs file {path}: ref_id {ref_id} appears twice (ref #{index})")
            seen_refs.add(ref_id)
            if ref["image_id"] not in self._images:
                raise DataError(
                    f"{name} in {path} refers to image_id {ref['image_id']}, which {self.instances_path} lacks"
                )
            ann = self._anns.get(ref["ann_id"])
            if ann is None:
                raise DataError(
                    f"{name} in {path} refers to ann_id {ref['ann_id']}, which {self.instances_path} lacks"
                )
            if ann.get("image_id") != ref["image_id"]:
                raise DataError(
                    f"{name} in {path}: annotation {ref['ann_id']} belongs to image {ann.get('image_id')!r}, "
                    f"not to the ref's image {ref['image_id']}"
                )
            if ann["id"] not in checked_anns:  # several refs may share one annotation: count it once
                checked_anns.add(ann["id"])
                self._check_segmentation(ann)
        return refs

    def _check_segmentation(self, ann: dict) -> None:
        """Refuse malformed segmentations; count the degenerate polygons `mask` will skip (`self.polygons`).

        A polygon that is not a flat list of numbers, or a broken RLE, means a broken file and is
        refused. A polygon that is merely degenerate (too few points, odd length, absurd coordinates)
        is what real COCO holds now and then: counted, never a reason to refuse the dataset.
        """
        where = f"annotation {ann['id']} in {self.instances_path}"
        seg = ann.get("segmentation")
        img = self._images[ann["image_id"]]
        if isinstance(seg, dict):
            self._check_rle(seg, img, where)
            return
        if not isinstance(seg, list):
            raise DataError(f"{where}: 'segmentation' must be a list of polygons or an RLE, got {seg!r:.60}")
        skipped = trimmed = usable = 0
        for k, part in enumerate(seg):
            if isinstance(part, dict):
                self._check_rle(part, img, f"{where} part #{k}")
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
            self.polygons.skipped += skipped
            self.polygons.trimmed += trimmed
            self.polygons.annotations.append(ann["id"])
        if not usable:
            self.polygons.empty.append(ann["id"])

    @staticmethod
    def _check_rle(rle: dict, img: dict, where: str) -> None:
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

    # ------------------------------------------------------------------ queries

    def splits(self) -> dict[str, dict[str, int]]:
        """Split name → {"refs", "sentences", "images"}, for the split names the refs file holds."""
        stats: dict[str, dict] = {}
        for ref in self._refs:
            s = stats.setdefault(ref["split"], {"refs": 0, "sentences": 0, "images": set()})
            s["refs"] += 1
            s["sentences"] += len(ref["sentences"])
            s["images"].add(ref["image_id"])
        return {
            name: {"refs": s["refs"], "sentences": s["sentences"], "images": len(s["images"])}
            for name, s in sorted(stats.items(), key=lambda kv: _split_sort_key(kv[0]))
        }

    def available_splits(self) -> list[str]:
        """Split names `samples` accepts: those in the file, plus test/testA/testB/testC where they select refs."""
        names = list(self.splits())
        for name in ("test", *_LETTER_SPLITS):
            if name not in names and any(in_split(name, r["split"]) for r in self._refs):
                names.append(name)
        return sorted(names, key=_split_sort_key)

    def refs(self, split: str) -> list[dict]:
        """The refs of `split`, in file order, selected as `refer.getRefIds` does (see `in_split`)."""
        chosen = [r for r in self._refs if in_split(split, r["split"])]
        if not chosen:
            raise DataError(
                f"unknown split {split!r} for {self.dataset} ({self.refs_path.name}); "
                f"available: {', '.join(self.available_splits())}"
            )
        return chosen

    def samples(self, split: str) -> list[Sample]:
        """One `Sample` per sentence of every ref of `split`, in file order."""
        out = []
        for ref in self.refs(split):
            path = self.image_path(ref["image_id"])
            for sent in ref["sentences"]:
                out.append(
                    Sample(
                        sent_id=sent["sent_id"],
                        ref_id=ref["ref_id"],
                        ann_id=ref["ann_id"],
                        image_id=ref["image_id"],
                        image_path=path,
                        sentence=sent[self.text_field],
                        category_id=ref["category_id"],
                    )
                )
        return out

    def ref(self, ref_id: int) -> dict:
        try:
            return self._refs_by_id[ref_id]
        except KeyError:
            raise DataError(f"no ref with ref_id {ref_id} in {self.refs_path}") from None

    def image(self, image_id: int) -> dict:
        """The COCO image entry (id, file_name, height, width, ...)."""
        try:
            return dict(self._images[image_id])
        except KeyError:
            raise DataError(f"no image with id {image_id} in {self.instances_path}") from None

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.image(image_id)["file_name"]

    def annotation(self, ann_id: int) -> dict:
        try:
            return self._anns[ann_id]
        except KeyError:
            raise DataError(f"no annotation with id {ann_id} in {self.instances_path}") from None

    def image_annotations(self, image_id: int) -> list[int]:
        """The ids of every annotation of an image (referred or not), in instances.json order."""
        if not hasattr(self, "_anns_by_image"):
            self._anns_by_image: dict[int, list[int]] = {}
            for ann_id, ann in self._anns.items():
                self._anns_by_image.setdefault(ann.get("image_id"), []).append(ann_id)
        return list(self._anns_by_image.get(image_id, []))

    def category_name(self, category_id: int) -> str:
        cat = self._categories.get(category_id)
        return str(cat.get("name", category_id)) if cat else str(category_id)

    def mask(self, ref_id: int, rule: str = "vpd") -> np.ndarray:
        """Ground-truth mask of a ref: bool (H, W) at the image's original size.

        Degenerate polygons are skipped (`usable_polygon`); an annotation with none left is all False.
        """
        return self.annotation_mask(self.ref(ref_id)["ann_id"], rule)

    def annotation_mask(self, ann_id: int, rule: str = "vpd") -> np.ndarray:
        """`mask` of any annotation, referred or not: bool (H, W) at the image's original size."""
        if rule not in MASK_RULES:
            raise RefsegError(f"unknown mask rule {rule!r}; choose one of: {', '.join(MASK_RULES)}")
        ann = self.annotation(ann_id)
        img = self._images[ann["image_id"]]
        h, w = img["height"], img["width"]
        seg = ann["segmentation"]
        try:
            parts = [seg] if isinstance(seg, dict) else seg
            # how many parts cover each pixel; uint8 and one part at a time keep a huge image's mask
            # at ~2 bytes per pixel (an int32 (H, W, n) stack took 12: 1.2 GB at 10,000 x 10,000)
            stack = np.zeros((h, w), dtype=np.uint8 if len(parts) < 255 else np.int32)
            # degenerate polygons are skipped (counted at construction): a 4-number one would be read as a box
            polygons = [q for q in (usable_polygon(p) for p in parts if isinstance(p, list)) if q is not None]
            if polygons:
                # one RLE per polygon, summed, as refer.getMask does with its (H, W, n) stack
                for rle in mask_utils.frPyObjects(polygons, h, w):
                    stack += decode_rle(rle)
            for part in parts:
                if isinstance(part, dict):
                    stack += self._rle_part_mask(part, h, w)
        except DataError:
            raise
        except Exception as exc:  # pycocotools reports garbled RLE strings as ValueError/others
            raise DataError(f"cannot rasterise annotation {ann['id']} in {self.instances_path}: {exc}") from None
        return stack == 1 if rule == "vpd" else stack >= 1

    @staticmethod
    def _rle_part_mask(rle: dict, h: int, w: int) -> np.ndarray:
        counts = rle["counts"]
        if isinstance(counts, list):
            encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        else:
            encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        m = decode_rle(encoded)
        if m.ndim == 3:
            m = m[..., 0]
        return m

    def __repr__(self) -> str:
        return (f"ReferDataset({str(self.data_root)!r}, {self.dataset!r}, split_by={self.split_by!r}, "
                f"refs={len(self._refs)})")
