"""A model folder that cannot be loaded (issue 23): one line naming the folder, the component and what is
wrong, never a traceback: wrong types in a config, invalid JSON, weights of other shapes."""

from __future__ import annotations

import json

import pytest
from _cli_util import refused_model_copy

from refseg.backbones.loading import save_backbone
from refseg.backbones.tiny import build_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_backbone(build_tiny(), tmp_path_factory.mktemp("model") / "tiny")


def edit_config(sub, **values):
    def edit(path):
        config = path / sub / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **values}))
    return edit


CASES = {
    "unet-wrong-type": (edit_config("unet", cross_attention_dim="big"), "its unet/ cannot be loaded: its config.json "
                                                                        "holds a value of the wrong type"),
    "vae-wrong-type": (edit_config("vae", latent_channels="four"), "its vae/ cannot be loaded: its config.json holds"),
    "text-wrong-type": (edit_config("text_encoder", hidden_size="wide"),
                        "its text_encoder/ cannot be loaded: its config.json holds a value of the wrong type "
                        "(Validation error for field 'hidden_size': TypeError"),
    "invalid-json": (lambda p: (p / "unet" / "config.json").write_text("{not json"), "is not a valid JSON file"),
    "other-shapes": (edit_config("unet", cross_attention_dim=48), "its unet/ cannot be loaded: its weights do not fit "
                                                                   "its config.json: down_blocks."),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_model_folder_is_one_clear_error(folder, tmp_path, case):
    refused_model_copy(folder, tmp_path, case, *CASES[case])
