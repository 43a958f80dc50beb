"""The error split (study/errors.py) on hand-made masks with known answers, and the references'
calls (study/references.py) on hand-made cells."""

import numpy as np
import pytest

from refseg.study.errors import KINDS, classify, split, split_markdown
from refseg.study.references import against, compare_with_every_object, sentence


def _box(y0, y1, x0, x1, size=16):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


REFERRED = _box(0, 4, 0, 4)  # 16 px, top left
OTHER = _box(8, 12, 8, 12)  # 16 px, bottom right
LARGE = _box(0, 8, 8, 16)  # 64 px, top right


def test_a_prediction_on_the_referred_object_with_iou_of_half_or_more_is_right():
    assert classify(REFERRED, REFERRED, [OTHER]) == "right"
    assert classify(_box(0, 4, 0, 2), REFERRED, [OTHER]) == "right"  # IoU 8/16 = 0.5 exactly
    assert classify(_box(0, 4, 0, 2) | _box(8, 9, 8, 12), REFERRED, [OTHER]) == "bad shape"  # 8/20 = 0.4


def test_a_prediction_on_another_object_is_the_wrong_object():
    assert classify(OTHER, REFERRED, [OTHER, LARGE]) == "wrong object"
    # a blob over the large neighbour with a corner of the referred one: IoU 48/68 against 4/64
    assert classify(_box(2, 8, 2, 16), REFERRED, [OTHER, LARGE]) == "wrong object"


def test_the_referred_object_most_overlapped_but_under_half_is_a_bad_shape():
    assert classify(_box(0, 2, 0, 3), REFERRED, [OTHER]) == "bad shape"  # IoU 6/16
    assert classify(_box(0, 16, 0, 4), REFERRED, [OTHER, LARGE]) == "bad shape"  # too tall: 16/64, others 0
    # a tie between the referred object and another counts for the referred one
    tie = _box(0, 1, 0, 4) | _box(8, 9, 8, 12)  # 4 px on each: IoU 4/28 with both
    assert classify(tie, REFERRED, [OTHER]) == "bad shape"


def test_a_prediction_that_touches_no_object_is_no_object():
    assert classify(np.zeros((16, 16), bool), REFERRED, [OTHER]) == "no object"
    assert classify(_box(14, 16, 0, 4), REFERRED, [OTHER, LARGE]) == "no object"  # background only
    assert classify(_box(14, 16, 0, 4), REFERRED, []) == "no object"  # an image of one object


def test_split_gives_each_kind_its_share():
    shares = split(["right", "right", "wrong object", "no object"])
    assert shares == {"right": 50.0, "wrong object": 25.0, "bad shape": 0.0, "no object": 25.0, "n": 4}
    table = split_markdown([{"head": "film", "noise_t": 0, "text_blind": True, "n_seeds": 2, **shares}])
    assert table.splitlines()[0] == "| head | T | " + " | ".join(f"{k} %" for k in KINDS) + " | n | seeds |"
    assert table.splitlines()[2] == "| film (no sentence) | 0 | 50.0 | 25.0 | 0.0 | 25.0 | 4 | 2 |"


def _cell(o_mean, o_std, m_mean, m_std, n=3):
    return {"oIoU_mean": o_mean, "oIoU_std": o_std, "mIoU_mean": m_mean, "mIoU_std": m_std, "n_seeds": n}


def test_a_cell_is_called_against_every_object_on_oiou_and_miou():
    objects = {"oIoU": 27.2, "mIoU": 31.2, "n": 335}
    # 29.9 ± 2·0.5/√3 = [29.32, 30.48]: every object is under it; 30.3 ± 2·0.6/√3 = [29.61, 30.99]: over it
    compared = compare_with_every_object(_cell(29.9, 0.5, 30.3, 0.6), objects)
    assert compared["oIoU"] == pytest.approx({"cell": 29.9, "reference": 27.2, "difference": 2.7, "call": "above"})
    assert compared["mIoU"]["call"] == "below" and compared["mIoU"]["difference"] == pytest.approx(-0.9)
    assert against(_cell(27.5, 1.0, 0, 0), objects, "oIoU")["call"] == "not clearly different"  # [26.35, 28.65]
    assert sentence("film T=0", compared) == ("film T=0 against every object (the sentence unread): "
                                              "oIoU 29.9 vs 27.2 (+2.7, above), mIoU 30.3 vs 31.2 (-0.9, below).")
