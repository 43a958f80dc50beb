"""Where a head's errors are: each val prediction sorted by which object of its image it landed on.

A prediction is
- "right"         when its IoU with the referred object is at least 0.5 (P@0.5's hit);
- "wrong object"  when it overlaps another object of the image more than the referred one (IoU with
                  each object; a grounding error: the sentence picked the wrong thing);
- "bad shape"     when the referred object is the most-overlapped (ties count for it) but the IoU is
                  under 0.5 (a resolution or decoding error: the right thing, drawn badly);
- "no object"     when it touches no object at all (empty, or on the background only).

The objects are every annotation of the image in the synthetic dataset's instances.json
(`ReferDataset.image_annotations`, `annotation_mask`), squashed to the cache's mask size by the cache's
own rule, as the cache's GT was. So "wrong object" against "bad shape" tells grounding problems from
resolution problems (issue 26).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refseg.cache import open_cache
from refseg.core.refer import ReferDataset
from refseg.core.transforms import mask_to_size
from refseg.heads.evaluate import predict

KINDS = ("right", "wrong object", "bad shape", "no object")
HIT = 0.5  # P@0.5's threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def classify(pred: np.ndarray, referred: np.ndarray, others: list[np.ndarray]) -> str:
    """One of KINDS for a boolean prediction, the referred object's mask and the image's other objects'."""
    pred = np.asarray(pred, bool)
    right = iou(pred, np.asarray(referred, bool))
    if right >= HIT:
        return "right"
    best_other = max((iou(pred, np.asarray(o, bool)) for o in others), default=0.0)
    if right == 0.0 and best_other == 0.0:
        return "no object"
    return "wrong object" if best_other > right else "bad shape"


def split(kinds: list[str]) -> dict:
    """{kind: percent of the predictions} for every kind of KINDS, and "n"."""
    n = len(kinds)
    return {**{k: 100 * kinds.count(k) / n if n else 0.0 for k in KINDS}, "n": n}


class ImageObjects:
    """Every annotated object of a val image at the cache's mask size and rule, made once per image."""

    def __init__(self, cache, data_root: Path):
        self.refer = ReferDataset(str(data_root), cache.extraction_record["dataset"]["dataset"])
        self.rule = cache.extraction_record["extraction"]["mask_rule"]
        self.size = cache.spec.image_size
        self._by_image: dict[int, dict[int, np.ndarray]] = {}

    def of(self, image_id: int) -> dict[int, np.ndarray]:
        """ann_id -> bool (S, S) mask, for every object of the image."""
        if image_id not in self._by_image:
            self._by_image[image_id] = {
                ann_id: mask_to_size(self.refer.annotation_mask(ann_id, self.rule), self.size) != 0
                for ann_id in self.refer.image_annotations(image_id)}
        return self._by_image[image_id]

    def kind(self, pred: np.ndarray, image_id: int, ref_id: int, gt: np.ndarray) -> str:
        """The prediction's kind; the referred object is the cache's GT (what the metrics score)."""
        referred = self.refer.ref(ref_id)["ann_id"]
        others = [m for ann_id, m in self.of(image_id).items() if ann_id != referred]
        return classify(pred, gt, others)


def run_kinds(run, val_cache, objects: ImageObjects, device: str = "cpu") -> list[str]:
    """The kind of each val prediction of one run (its best checkpoint), in the cache's row order."""
    cache = open_cache(val_cache)
    index = cache.index
    kinds = []
    for record in predict(run, cache, device=device):
        row = record["row"]
        kinds.append(objects.kind(record["pred"], int(index["image_id"][row]), record["ref_id"],
                                  cache.gt([row])[0] != 0))
    return kinds


def error_split(cells: list[dict], val_cache, data_root: Path, device: str = "cpu") -> list[dict]:
    """Per cell (head, T, no sentence or not): the split of its val predictions, mean over its seeds
    (each seed's percentages, then their mean), as {"head", "noise_t", "text_blind", "n_seeds", KINDS..., "n"}."""
    rows, by_cache = [], {}
    for cell in cells:
        if not cell.get("runs"):
            continue
        cache_path = str(cell.get("val_cache", val_cache))
        if cache_path not in by_cache:
            by_cache[cache_path] = ImageObjects(open_cache(cache_path), data_root)
        seeds = [split(run_kinds(run, cache_path, by_cache[cache_path], device)) for run in cell["runs"]]
        rows.append({"head": cell["head"], "noise_t": int(cell["noise_t"]), "text_blind": bool(cell.get("text_blind")),
                     "n_seeds": len(seeds), "n": seeds[0]["n"],
                     **{k: float(np.mean([s[k] for s in seeds])) for k in KINDS}})
    return rows


def split_markdown(rows: list[dict]) -> str:
    """The split as a table: one row per cell, each kind's share of the val predictions (%)."""
    lines = ["| head | T | " + " | ".join(f"{k} %" for k in KINDS) + " | n | seeds |",
             "|---|---:|" + "---:|" * (len(KINDS) + 2)]
    for r in rows:
        head = f"{r['head']} (no sentence)" if r["text_blind"] else r["head"]
        lines.append(f"| {head} | {r['noise_t']} | " + " | ".join(f"{r[k]:.1f}" for k in KINDS)
                     + f" | {r['n']} | {r['n_seeds']} |")
    return "\n".join(lines) + "\n"
