"""RefSegMetrics against hand-computed values (docs/DESIGN.md §8)."""

import numpy as np
import pytest
import torch

from refseg.core.metrics import RefSegMetrics, format_table


def _mask(shape, *cells):
    m = np.zeros(shape, bool)
    for r, c in cells:
        m[r, c] = True
    return m


def _five_sentences():
    """(pred, gt) pairs with I/U = 2/6, 5/5, 0/3 (empty prediction), 0/0 (empty union), 3/5."""
    s = (4, 4)
    return [
        (_mask(s, (0, 0), (0, 1), (3, 3), (3, 2)), _mask(s, (0, 0), (0, 1), (1, 0), (1, 1))),
        (_mask(s, (0, 0), (1, 1), (2, 2), (3, 3), (0, 3)), _mask(s, (0, 0), (1, 1), (2, 2), (3, 3), (0, 3))),
        (_mask(s), _mask(s, (2, 0), (2, 1), (2, 2))),
        (_mask(s), _mask(s)),
        (_mask(s, (1, 0), (1, 1), (1, 2), (1, 3)), _mask(s, (1, 0), (1, 1), (1, 2), (2, 0))),
    ]


def test_update_returns_iou_and_summary_matches_hand_computation():
    m = RefSegMetrics()
    ious = [m.update(p, g) for p, g in _five_sentences()]
    assert ious == pytest.approx([1 / 3, 1.0, 0.0, 0.0, 0.6])
    s = m.summary()
    assert set(s) == {"P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU", "n"}
    assert s["n"] == 5 and isinstance(s["n"], int)
    # IoU 0.6 counts for P@0.6 (>=); only the perfect one passes 0.7..0.9
    assert [s[k] for k in ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9")] == pytest.approx([40, 40, 20, 20, 20])
    assert s["mIoU"] == pytest.approx(100 * (1 / 3 + 1 + 0.6) / 5)
    assert s["oIoU"] == pytest.approx(100 * (2 + 5 + 0 + 0 + 3) / (6 + 5 + 3 + 0 + 5))


def test_add_counts_equals_update():
    a, b = RefSegMetrics(), RefSegMetrics()
    for p, g in _five_sentences():
        a.update(p, g)
    for i, u in [(2, 6), (5, 5), (0, 3), (0, 0), (3, 5)]:
        b.add(i, u)
    assert a.summary() == b.summary()
    with pytest.raises(ValueError):
        b.add(3, 2)


def test_empty_metrics_are_zero():
    assert RefSegMetrics().summary() == {
        "P@0.5": 0.0, "P@0.6": 0.0, "P@0.7": 0.0, "P@0.8": 0.0, "P@0.9": 0.0, "oIoU": 0.0, "mIoU": 0.0, "n": 0,
    }


def test_only_empty_unions():
    m = RefSegMetrics()
    assert m.update(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    s = m.summary()
    assert s["n"] == 1 and s["oIoU"] == 0.0 and s["mIoU"] == 0.0 and s["P@0.5"] == 0.0


def test_accepts_uint8_and_tensors_and_checks_shapes():
    m = RefSegMetrics()
    pred = np.array([[1, 0], [1, 1]], np.uint8)
    assert m.update(pred, torch.tensor([[True, False], [False, True]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_merge_and_custom_thresholds():
    a, b = RefSegMetrics(thresholds=(0.25,)), RefSegMetrics(thresholds=(0.25,))
    a.add(1, 4)
    b.add(0, 4)
    s = a.merge(b).summary()
    assert s["P@0.25"] == 50.0 and s["n"] == 2 and s["oIoU"] == pytest.approx(12.5)


def test_format_table():
    m = RefSegMetrics()
    for p, g in _five_sentences():
        m.update(p, g)
    table = format_table([("T=0", m.summary()), ("T=500", RefSegMetrics().summary())])
    assert table.splitlines() == [
        "| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| T=0 | 40.00 | 40.00 | 20.00 | 20.00 | 20.00 | 52.63 | 38.67 |",
        "| T=500 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |",
    ]
    assert format_table([], first_col="Head").startswith("| Head | P@0.5")
