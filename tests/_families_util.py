"""A family's end to end through the commands, as the family tests run it: refseg-extract of the
synthetic train and val splits at 64 px (6 samples each), then refseg-train-head (1 epoch) and refseg-eval."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner


def extract_splits(model: str, synth_root, out: Path, noise_t: int, token_length: int) -> None:
    """`out/train.zarr` and `out/val.zarr` at noise level `noise_t`."""
    from refseg.extract.cli import main as extract_main

    for split in ("train", "val"):
        result = CliRunner().invoke(extract_main, [
            "--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", split, "--model", model,
            "--image-size", "64", "--token-length", str(token_length), "--noise-t", str(noise_t), "--limit", "6",
            "--shard-size", "4", "--out", str(out / f"{split}.zarr"), "--quiet", "--threads", "1"])
        assert result.exit_code == 0, result.output


def train_and_evaluate(out: Path, noise_t: int, head: str) -> dict:
    """Train `head` for one epoch on `out/train.zarr` (val: `out/val.zarr`), then its refseg-eval summary."""
    from refseg.heads.cli_eval import main as eval_main
    from refseg.heads.cli_train import main as train_main

    run = out / "run"
    result = CliRunner().invoke(train_main, [
        "--cache", str(out / "train.zarr"), "--val-cache", str(out / "val.zarr"), "--noise-t", str(noise_t),
        "--head", head, "--out", str(run), "--epochs", "1", "--hidden", "8", "--batch-size", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(out / "val.zarr"), "--json",
                                            str(out / "e.json"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "e.json").read_text())["summary"]
