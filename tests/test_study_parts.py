"""The study's parts on their own: `refseg-report --help` loads no torch, the every-object reference is
scored as `RefSegMetrics` scores it, and the demo's settings are refused by the extraction's own checks
before any model is loaded."""

import subprocess
import sys

import pytest

from refseg.core.errors import RefsegError
from refseg.study.demo_config import DemoConfig
from refseg.study.references import scores


def test_the_report_command_imports_no_torch_for_its_help():
    code = ("import sys; import refseg.study.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scores_are_the_metrics_summary_of_the_samples():
    # oIoU = ΣI/ΣU = 4/9; mIoU = mean(3/4, 0 (an empty union), 1/5)
    got = scores({7: (3, 4), 8: (0, 0), 9: (1, 5)})
    assert got == {"oIoU": 400 / 9, "mIoU": pytest.approx(100 * (0.75 + 0.0 + 0.2) / 3, abs=1e-12), "n": 3}


@pytest.mark.parametrize("settings, words", [
    ({"noise_ts": (0, 10000)}, "--noise-t takes steps of the model's noise schedule, 0..999"),
    ({"noise_ts": ()}, "--noise-t needs at least one noise level"),
    ({"train_samples": 0}, "--train-samples must be at least 1 (got 0)"),
    ({"image_size": 16}, "--image-size must be at least 32 (got 16)"),
    ({"baseline": "some"}, "--baseline takes best, all, none"),
])
def test_demo_settings_are_refused_before_a_model_loads(tmp_path, settings, words):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model="no-such-model", **settings)
    with pytest.raises(RefsegError) as caught:
        cfg.check()
    assert words in str(caught.value)
    assert not (tmp_path / "demo").exists()
