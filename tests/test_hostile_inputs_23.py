"""Hostile inputs (issue 23, second pass): model folders whose configs and weights disagree, wide and
odd images, names in messages, and refseg-predict's files. Each test fails on the code before it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from refseg.core.errors import ModelError


# ---- model folders: a config and weights of different models are refused, never run half-random ----
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from refseg.backbones.loading import save_backbone
    from refseg.backbones.tiny import build_tiny

    return save_backbone(build_tiny(), tmp_path_factory.mktemp("model") / "tiny")


def drop_weight(sub: str, file: str, name_part: str):
    """Remove the first tensor whose name contains `name_part` from `sub/file`."""
    def edit(folder):
        tensors = load_file(folder / sub / file)
        del tensors[next(k for k in sorted(tensors) if name_part in k)]
        save_file(tensors, folder / sub / file)
    return edit


def set_config(sub: str, file: str = "config.json", **values):
    def edit(folder):
        path = folder / sub / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return edit


def write(sub: str, file: str, text: str):
    return lambda folder: (folder / sub / file).write_text(text)


BROKEN = {
    # weights the config describes but the files lack: diffusers left them uninitialised, transformers random
    "unet-weight-missing": (drop_weight("unet", "diffusion_pytorch_model.safetensors", "conv_in.bias"),
                            "its unet/ cannot be loaded: its weights lack 1 tensor(s) that its config.json describes "
                            "(conv_in.bias)"),
    "vae-weight-missing": (drop_weight("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_in.bias"),
                           "its vae/ cannot be loaded: its weights lack 1 tensor(s) that its config.json describes "
                           "(decoder.conv_in.bias)"),
    "text-more-layers": (set_config("text_encoder", num_hidden_layers=5),
                         "its text_encoder/ cannot be loaded: its weights lack 48 tensor(s) that its config.json "
                         "describes (encoder.layers.2."),
    # other shapes: the first weight named with both shapes (transformers said "look at the above report!")
    "text-other-shapes": (set_config("text_encoder", intermediate_size=100),
                          "its text_encoder/ cannot be loaded: its weights do not fit its config.json: "
                          "encoder.layers.0.mlp.fc1.weight is [64, 32] in the weights but the config makes it "
                          "[100, 32] (6 tensors differ)"),
    "unet-other-shapes": (set_config("unet", layers_per_block=3),
                          "its unet/ cannot be loaded: its weights do not fit its config.json: up_blocks.2.resnets.2."
                          "norm1.weight is [96] in the weights but the config makes it [128] (4 tensors differ)"),
    # a JSON value that is not a config (diffusers read the list as a hub id to download)
    "unet-config-list": (write("unet", "config.json", "[1, 2]"),
                         "its unet/ cannot be loaded: unet/config.json holds a JSON list, not the object of settings"),
    "text-config-list": (write("text_encoder", "config.json", "[]"),
                         "its text_encoder/ cannot be loaded: text_encoder/config.json holds a JSON list"),
    "vae-config-empty": (write("vae", "config.json", ""),
                         "its vae/ cannot be loaded: vae/config.json is not a valid JSON file (Expecting value"),
    # the scheduler's settings of the wrong type (a traceback when the first noise level was set)
    "scheduler-wrong-type": (set_config("scheduler", "scheduler_config.json", num_train_timesteps="many"),
                             "its scheduler/ cannot be loaded: its scheduler_config.json holds a value of the wrong "
                             "type (invalid literal for int()"),
    # an unreadable model_index.json: the family is unknown (it was taken as SD1.x)
    "index-invalid": (lambda folder: (folder / "model_index.json").write_text("{oops"),
                      "its model_index.json is not a JSON object naming the pipeline"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_model_folder_whose_config_and_weights_disagree_is_refused(model_folder, tmp_path, case):
    from refseg.backbones.loading import load_backbone

    edit, words = BROKEN[case]
    broken = tmp_path / case
    shutil.copytree(model_folder, broken)
    edit(broken)
    with pytest.raises(ModelError) as err:
        load_backbone(str(broken))
    message = str(err.value)
    assert message.startswith(f"cannot load model {str(broken)!r}: ") and words in message, message
    assert "\n" not in message


def test_a_missing_weights_file_prints_nothing_beside_the_error(model_folder, tmp_path):
    """diffusers logged "An error occurred while trying to fetch ..." above the one-line error (a process of
    its own: diffusers' log handler writes to the stderr of the moment it was imported)."""
    broken = tmp_path / "no-weights"
    shutil.copytree(model_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    script = ("import sys\nfrom refseg.backbones.loading import load_backbone\nfrom refseg.core.errors import ModelError\n"
              "try:\n    load_backbone(sys.argv[1])\nexcept ModelError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(broken)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "its unet/ cannot be loaded: Error no file named diffusion_pytorch_model" in done.stdout, done
    assert done.stderr == "", done.stderr


def test_the_untouched_folder_still_loads_to_the_same_weights(model_folder):
    from refseg.backbones.loading import load_backbone

    a, b = load_backbone("tiny"), load_backbone(str(model_folder))
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"]
