"""The study's cells against "every object of the image" (the sentence unread), on oIoU and on mIoU.

A head that segments should beat every object clearly on both (the sentence picks one object of the
2–5); a head that reads no sentence can at best find every object, so its no-sentence baseline should
land near it. Each comparison is called against the cell's interval over seeds (`stats.interval`):
the reference is a fixed number, computed once from the dataset, so only the seeds' spread counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refseg.cache import open_cache
from refseg.core.metrics import RefSegMetrics
from refseg.core.refer import ReferDataset
from refseg.core.synthetic import SENTENCE_KINDS, sentence_kind
from refseg.core.transforms import mask_to_size
from refseg.study.stats import interval

METRICS = ("oIoU", "mIoU")


def against(cell: dict, reference: dict, metric: str) -> dict:
    """{"cell", "reference", "difference", "call"}: "above" where the reference is under the cell's
    interval, "below" where it is over it, "not clearly different" otherwise."""
    mean, ref = float(cell[f"{metric}_mean"]), float(reference[metric])
    lo, hi = interval(cell, metric)
    call = "above" if ref < lo else "below" if ref > hi else "not clearly different"
    return {"cell": mean, "reference": ref, "difference": mean - ref, "call": call}


def compare_with_every_object(cell: dict, every_object: dict) -> dict:
    """metric -> `against` for oIoU and mIoU."""
    return {metric: against(cell, every_object, metric) for metric in METRICS}


def sentence(name: str, comparison: dict) -> str:
    """'film T=0 against every object (the sentence unread): oIoU 29.9 vs 27.2 (+2.7, above), mIoU ...'"""
    parts = [f"{metric} {c['cell']:.1f} vs {c['reference']:.1f} ({c['difference']:+.1f}, {c['call']})"
             for metric, c in comparison.items()]
    return f"{name} against every object (the sentence unread): " + ", ".join(parts) + "."


def chance_levels(val_cache: Path) -> dict:
    """What knowing nothing gives on val: oIoU and mIoU (%) of predicting every pixel (the masks' area)."""
    cache = open_cache(val_cache)
    n, fg, share = cache.n_samples, 0, []
    for start in range(0, n, 256):
        gt = cache.gt(list(range(start, min(n, start + 256)))) != 0
        fg += int(gt.sum())
        share += list(gt.reshape(len(gt), -1).mean(1))
    pixels = n * cache.spec.image_size ** 2
    return {"oIoU": 100 * fg / pixels, "mIoU": 100 * float(np.mean(share)), "n": n}


def every_object_samples(val_cache: Path, data_root: Path) -> dict[int, tuple[int, int]]:
    """sent_id -> (intersection, union) on val of predicting the union of every annotated object of the
    sentence's image (at the cache's mask size and rule), the sentence unread. A text-blind head can
    learn that much; only the sentence can pick the one object out of the 2–5."""
    cache = open_cache(val_cache)
    rule = cache.extraction_record["extraction"]["mask_rule"]
    refer = ReferDataset(str(data_root), cache.extraction_record["dataset"]["dataset"])
    size = cache.spec.image_size
    out, by_image = {}, {}  # an image's union, made once for all of its sentences
    for row, (sent_id, image_id) in enumerate(zip(cache.index["sent_id"], cache.index["image_id"])):
        if int(image_id) not in by_image:
            every = np.zeros((size, size), bool)
            for ann_id in refer.image_annotations(int(image_id)):
                every |= mask_to_size(refer.annotation_mask(ann_id, rule), size) != 0
            by_image[int(image_id)] = every
        every = by_image[int(image_id)]
        gt = cache.gt([row])[0] != 0
        out[int(sent_id)] = (int((every & gt).sum()), int((every | gt).sum()))
    return out


def scores(samples: dict[int, tuple[int, int]]) -> dict:
    """{"oIoU", "mIoU", "n"}: oIoU and mIoU (%) of {sent_id: (i, u)}, as `RefSegMetrics` scores them (an
    empty union scores 0, as LAVT counts it)."""
    metrics = RefSegMetrics()
    for intersection, union in samples.values():
        metrics.add(intersection, union)
    summary = metrics.summary()
    return {key: summary[key] for key in ("oIoU", "mIoU", "n")}


def by_sentence_kind(columns: dict[str, dict[int, tuple[int, int]]], val_cache: Path) -> str:
    """Markdown: the val oIoU of each column ({name: {sent_id: (i, u)}}) per kind of sentence
    (`synthetic.sentence_kind`: attribute, position among look-alikes, relation to an anchor)."""
    cache = open_cache(val_cache)
    kind_of = {int(sid): sentence_kind(text) for sid, text in zip(cache.index["sent_id"], cache.texts)}
    lines = ["| sentence kind | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for kind in SENTENCE_KINDS + ("all",):
        ids = [sid for sid, k in kind_of.items() if kind in (k, "all")]
        if not ids:
            continue
        cells = [f"{scores({sid: col[sid] for sid in ids})['oIoU']:.1f}" for col in columns.values()]
        lines.append(f"| {kind} | {len(ids)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
