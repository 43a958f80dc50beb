"""A tiny hand-written RefCOCO-format dataset for the reader's tests, with the expected masks.

Image 1 (20 x 30): ann 101 = two overlapping 10x10 squares (vpd drops their 5x5 overlap),
                   ann 102 = a triangle reaching outside the image.
Image 2 (10 x 10): ann 103 = crowd RLE with list counts, ann 104 = crowd RLE with string counts.
Refs: 0 -> 101 train (2 sentences), 1 -> 102 testA, 2 -> 103 testB (2 sentences), 3 -> 104 val (3).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

DATASET = "tinyref"

SQUARE_A = [0, 0, 10, 0, 10, 10, 0, 10]
SQUARE_B = [5, 5, 15, 5, 15, 15, 5, 15]


def expected_masks() -> dict:
    """Hand-computed masks (pycocotools fills [x0, x1) x [y0, y1) for an axis-aligned square)."""
    union = np.zeros((20, 30), bool)
    union[0:10, 0:10] = True
    union[5:15, 5:15] = True
    vpd = union.copy()
    vpd[5:10, 5:10] = False
    # list counts [5, 10, 85] over a 10x10 image, column-major: column 0 rows 5-9, column 1 rows 0-4
    crowd_list = np.zeros((10, 10), bool)
    crowd_list[5:10, 0] = True
    crowd_list[0:5, 1] = True
    crowd_str = np.zeros((10, 10), bool)
    crowd_str[2:7, 3:9] = True
    crowd_str[8, 0] = True
    return {"vpd": vpd, "union": union, "crowd_list": crowd_list, "crowd_str": crowd_str}


def instances() -> dict:
    crowd_str = expected_masks()["crowd_str"]
    rle = mask_utils.encode(np.asfortranarray(crowd_str.astype(np.uint8)))
    return {
        "images": [
            {"id": 1, "file_name": "img_one.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "img_two.jpg", "height": 10, "width": 10},
        ],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [SQUARE_A, SQUARE_B]},
            {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0,
             "segmentation": [[20.5, -4.0, 40.0, 25.0, 12.0, 25.0]]},
            {"id": 103, "image_id": 2, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [10, 10], "counts": [5, 10, 85]}},
            {"id": 104, "image_id": 2, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [10, 10], "counts": rle["counts"].decode("ascii")}},
            {"id": 105, "image_id": 2, "category_id": 2, "iscrowd": 0,
             "segmentation": [[1, 1, 2, 1, 2, 2]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }


def _sent(sent_id, text):
    return {"sent_id": sent_id, "sent": text, "raw": text.capitalize() + ".", "tokens": text.split()}


def refs() -> list:
    def ref(ref_id, ann_id, image_id, cat, split, sents):
        return {
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": cat, "split": split,
            "sent_ids": [s["sent_id"] for s in sents], "sentences": sents,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        }

    return [
        ref(0, 101, 1, 1, "train", [_sent(10, "man on left"), _sent(11, "left guy")]),
        ref(1, 102, 1, 2, "testA", [_sent(12, "dog on right")]),
        ref(2, 103, 2, 1, "testB", [_sent(13, "crowd"), _sent(14, "people in back")]),
        ref(3, 104, 2, 2, "val", [_sent(15, "the dogs"), _sent(16, "dog pack"), _sent(17, "all dogs")]),
    ]


def write_tiny_dataset(root: Path, refs_data=None, instances_data=None, refs_bytes: bytes | None = None) -> Path:
    """Write <root>/tinyref/{refs(unc).p, instances.json}; returns root (the data root)."""
    folder = Path(root) / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    if refs_bytes is None:
        refs_bytes = pickle.dumps(refs() if refs_data is None else refs_data, protocol=2)
    (folder / "refs(unc).p").write_bytes(refs_bytes)
    (folder / "instances.json").write_text(json.dumps(instances() if instances_data is None else instances_data))
    return Path(root)


def py2_pickle(obj) -> bytes:
    """Pickle plain data the way Python 2's cPickle (protocol 2) writes `str`: as byte strings.

    Python 3 cannot write these opcodes for `str`, and the real refs(unc).p files are full of them.
    """
    out = bytearray(b"\x80\x02")

    def emit(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))  # BININT
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))  # BINFLOAT
        elif isinstance(o, str):
            raw = o.encode("latin1")
            if len(raw) < 256:
                out.extend(b"U" + bytes([len(raw)]) + raw)  # SHORT_BINSTRING
            else:
                out.extend(b"T" + struct.pack("<i", len(raw)) + raw)  # BINSTRING
        elif isinstance(o, list):
            out.extend(b"](")  # EMPTY_LIST, MARK
            for v in o:
                emit(v)
            out.extend(b"e")  # APPENDS
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"t")
        elif isinstance(o, dict):
            out.extend(b"}(")  # EMPTY_DICT, MARK
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")  # SETITEMS
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)
