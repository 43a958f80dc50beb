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

The files are read and checked by `refseg.core.refer_files` (on construction, so a malformed file
fails there, naming itself); this module holds the dataset's queries and its masks.

Splits are selected as `refer.getRefIds` does: ``testA``/``testB``/``testC`` take every ref whose
split contains the letter (a ``testAB`` ref is in testA and testB), ``test`` every split containing
``test``, any other name (train, val, testAB, ...) the refs whose split equals it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from refseg.core.errors import DataError, RefsegError
from refseg.core.refer_files import PolygonReport, decode_rle, read_instances, read_refs, usable_polygon

MASK_RULES = ("vpd", "union")
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

        self._images, self._anns, self._categories = read_instances(self.instances_path)
        self.polygons = PolygonReport(path=str(self.instances_path))
        self._refs = read_refs(self.refs_path, self.text_field, self._images, self._anns, self.instances_path,
                               self.polygons)
        self._refs_by_id = {ref["ref_id"]: ref for ref in self._refs}
        if self.polygons:
            # once per dataset, here rather than per mask: a split can hold thousands of sentences
            warnings.warn(self.polygons.describe(), DegeneratePolygonWarning, stacklevel=2)

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
