"""bench/demo_scale.py at toy size: its JSON line carries the demo's references and error split."""

import json

import pytest

from bench import demo_scale
from refseg.study.errors import KINDS


def test_demo_scale_reports_every_object_on_both_metrics_and_the_error_split(capsys):
    demo_scale.main(["--tiny", "--device", "cpu"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cells = report["cells"]
    assert [(c["noise_t"], c["text_blind"]) for c in cells] == [(0, False), (5, False), (500, False),
                                                               (0, True), (5, True), (500, True)]
    against = report["against_every_object"]
    assert set(against) == {"best", "no sentence"}
    best = max((c for c in cells if not c["text_blind"]), key=lambda c: c["oIoU_mean"])
    for metric in ("oIoU", "mIoU"):
        assert against["best"][metric]["cell"] == best[f"{metric}_mean"]
        assert against["best"][metric]["reference"] == report["every_object"][metric]
    assert [(r["noise_t"], r["text_blind"]) for r in report["errors"]] == [(c["noise_t"], c["text_blind"]) for c in cells]
    for row, cell in zip(report["errors"], cells):
        assert sum(row[k] for k in KINDS) == pytest.approx(100.0)
        assert row["right"] == pytest.approx(cell["P@0.5_mean"])
