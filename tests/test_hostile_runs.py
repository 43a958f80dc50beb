"""Hostile head checkpoints and run directories from another head (issue 7, point 4).

test_heads_train.py / test_heads_cli.py already refuse garbage bytes as a checkpoint, a .pt file, and
--resume with another --head. Here: a checkpoint that is a pickle built to run code, and run
directories whose files come from a different head or other head settings: `refseg-eval` and
`refseg-train-head --resume` must stop with one line (exit 2), never unpickle, never crash.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _cli_util import one_line_error as _one_line_error
from _heads_util import make_cache
from click.testing import CliRunner

from refseg.heads import train
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main

T = 5
FAST = dict(epochs=1, batch_size=8, lr=1e-3, optimizer="adam", progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One cache and four one-epoch runs: vpd (hidden 8), vpd (hidden 16), film (hidden 8), linear."""
    root = tmp_path_factory.mktemp("hostile-runs")
    make_cache(root / "c.zarr", 16, seed=0)
    for name, head, hidden in (("vpd", "vpd", 8), ("vpd16", "vpd", 16), ("film", "film", 8), ("linear", "linear", 8)):
        train(root / "c.zarr", T, head, root / name, hidden=hidden, **FAST)
    return root


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_run(runs, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(runs / name, target)
    return target



def _evaluate(run, cache):
    return CliRunner().invoke(eval_main, ["--run", str(run), "--cache", str(cache), "--checkpoint", "last"])


def _resume(run, cache, head="vpd", hidden=8):
    return CliRunner().invoke(train_main, ["--cache", str(cache), "--noise-t", str(T), "--head", head, "--out",
                                           str(run), "--resume", "--epochs", "2", "--batch-size", "8", "--lr",
                                           "1e-3", "--optimizer", "adam", "--hidden", str(hidden)])


def test_a_checkpoint_that_is_a_code_running_pickle_is_refused_unread(runs, tmp_path):
    run = _copy_run(runs, "vpd", tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"classifier.weight": _RunsCode(marker)}, run / "head.safetensors")  # a torch .pt in disguise
    _one_line_error(_evaluate(run, runs / "c.zarr"), "head.safetensors is not a valid safetensors file")
    torch.save({"model.x": _RunsCode(marker)}, run / "state.safetensors")
    _one_line_error(_resume(run, runs / "c.zarr"), "state.safetensors is not a valid safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("source, file, command, needles", [
    ("linear", "head.safetensors", "eval", ["does not fit head 'vpd'", "size mismatch for classifier.weight"]),
    ("vpd16", "head.safetensors", "eval", ["does not fit head 'vpd' {'hidden': 8", "size mismatch for blocks.0.0.weight"]),
    ("film", "config.json", "eval", ["does not fit head 'film'", "missing ['film."]),
    ("film", "state.safetensors", "resume", ["state.safetensors does not fit head 'vpd'", "Unexpected key(s)"]),
    ("vpd16", "state.safetensors", "resume", ["state.safetensors does not fit head 'vpd'", "size mismatch"]),
], ids=["weights-of-linear", "weights-of-wider-vpd", "config-of-film", "state-of-film", "state-of-wider-vpd"])
def test_run_directory_holding_another_heads_files_is_refused(runs, tmp_path, source, file, command, needles):
    run = _copy_run(runs, "vpd", tmp_path)
    shutil.copy(runs / source / file, run / file)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _evaluate(run, runs / "c.zarr") if command == "eval" else _resume(run, runs / "c.zarr")
    _one_line_error(result, *needles)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing of the run was changed


def test_config_that_is_not_json_is_refused(runs, tmp_path):
    run = _copy_run(runs, "vpd", tmp_path)
    (run / "config.json").write_text('{"head": "vpd", "head_args": ')
    _one_line_error(_evaluate(run, runs / "c.zarr"), "config.json is not valid JSON")
