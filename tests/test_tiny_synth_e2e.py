"""`--model tiny-synth` from the installed package, offline, through extract -> train -> eval (issue 8)."""

import json
import math

from click.testing import CliRunner

from refseg.cache import open_cache
from refseg.extract.cli import main as extract_main
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main


def test_tiny_synth_runs_through_the_toolkit(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    caches = {}
    for split in ("train", "val"):
        caches[split] = tmp_path / f"{split}.zarr"
        done = runner.invoke(extract_main, [
            "--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", split, "--model", "tiny-synth",
            "--noise-t", "5", "--image-size", "64", "--token-length", "16", "--limit", "8",
            "--out", str(caches[split]), "--quiet"])
        assert done.exit_code == 0, done.output
    cache = open_cache(caches["train"])
    assert cache.extraction_record["backbone"]["model"] == "tiny-synth" and \
        cache.extraction_record["backbone"]["kind"] == "tiny-synth"
    assert cache.done(5).all() and cache.spec["s8"].channels == 32

    run = tmp_path / "run"
    done = runner.invoke(train_main, ["--cache", str(caches["train"]), "--noise-t", "5", "--head", "film",
                                      "--out", str(run), "--val-cache", str(caches["val"]), "--epochs", "1",
                                      "--hidden", "8", "--batch-size", "4"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(eval_main, ["--run", str(run), "--cache", str(caches["val"]), "--json", str(tmp_path / "e.json")])
    assert done.exit_code == 0, done.output
    assert "P@0.5" in done.output and "oIoU" in done.output and "mIoU" in done.output  # the printed table
    summary = json.loads((tmp_path / "e.json").read_text())["summary"]
    assert summary["n"] == 8 and all(math.isfinite(summary[k]) for k in ("oIoU", "mIoU"))
