"""The vpd-tiny fixture (tests/fixtures/vpd-tiny) as refseg reads it: paths, and its two samples written as
a RefCOCO-format dataset (split val) so that `refseg-extract` can run on them. Used by
tests/test_vpd_import.py and bench/vpd_fixture.py (the GPU check); no pytest here."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "vpd-tiny"
CKPT, BASE = FIXTURE / "vpd_refer.pth", FIXTURE / "base"
DATASET_NAME = "vpdtiny"


def write_fixture_dataset(root: Path) -> Path:
    """The fixture's samples as a RefCOCO-format dataset (split val), the target polygons as annotations."""
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    folder = root / DATASET_NAME
    (folder / "images").mkdir(parents=True)
    images, anns, refs = [], [], []
    for i, s in enumerate(meta["samples"]):
        name = Path(s["file"]).name
        shutil.copy(FIXTURE / s["file"], folder / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": s["height"], "width": s["width"]})
        anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "segmentation": [s["target"]["polygon"]]})
        sent = {"sent_id": 10 + i, "sent": s["sentence"], "raw": s["sentence"], "tokens": s["sentence"].split()}
        refs.append({"ref_id": i, "ann_id": 100 + i, "image_id": i + 1, "category_id": 1, "split": "val",
                     "sent_ids": [10 + i], "sentences": [sent], "file_name": name})
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "shape"}]}))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root
