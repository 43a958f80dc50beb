"""End to end on a real extracted cache (tiny backbone, synthetic data): extract -> train -> eval."""

import json

from click.testing import CliRunner

from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main


def test_extract_train_eval(extract_config, tiny_backbone, tmp_path):
    from refseg.extract.pipeline import run_extraction

    for split in ("train", "val"):
        run_extraction(extract_config(tmp_path / f"{split}.zarr", split=split, noise_ts=(5,), limit=8),
                       backbone=tiny_backbone)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_main, [
        "--cache", str(tmp_path / "train.zarr"), "--val-cache", str(tmp_path / "val.zarr"), "--noise-t", "5",
        "--head", "film", "--out", str(run), "--epochs", "2", "--hidden", "8", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(eval_main, [
        "--run", str(run), "--cache", str(tmp_path / "val.zarr"), "--protocol", "original", "--json",
        str(tmp_path / "e.json"), "--overlays", str(tmp_path / "ov"), "--max-overlays", "2"])
    assert result.exit_code == 0, result.output
    assert "| T=5 | " in result.output
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["summary"]["n"] > 0 and info["protocol"] == "original"
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    # the val cache of the same extraction is compatible; its settings differ only in the dataset part
    assert info["cache_settings"]["backbone"] == json.loads((run / "config.json").read_text())["cache"]["settings"]["backbone"]
