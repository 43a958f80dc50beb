"""One contract for every family and backbone: no attribute-or-method fallbacks, no default family, and
what a command keeps on Ctrl-C declared by the command itself (issue 25 §3)."""

import dataclasses
import inspect

import pytest
import torch

from refseg.backbones.families import FAMILIES
from refseg.backbones.families.base import Family
from refseg.backbones.families.transformer import TransformerFamily
from refseg.backbones.families.unet import UNetFamily
from refseg.backbones.loading import Backbone
from refseg.core import cli as core_cli


@pytest.mark.parametrize(("name", "prediction_type", "size"), [
    ("sd", "epsilon", 512), ("sd", "v_prediction", 768), ("sd2", "v_prediction", 768), ("sd2", "epsilon", 512),
    ("sdxl", "epsilon", 1024), ("sd3", None, 1024), ("flux", None, 1024)])
def test_every_family_names_its_training_size_through_one_method(name, prediction_type, size):
    components = {"scheduler_config": {"prediction_type": prediction_type}}
    assert FAMILIES[name].default_image_size(components) == size
    backbone = Backbone(FAMILIES[name], components, {}, torch.device("meta"), torch.float32)
    assert backbone.default_image_size == size


def test_image_size_is_a_method_of_the_base_class_only_not_an_attribute_too():
    assert inspect.isfunction(Family.default_image_size)
    for family in FAMILIES.values():
        assert not hasattr(family, "image_size_default")
        assert callable(family.default_image_size)


def test_a_backbone_needs_its_family_and_reads_its_parts_from_its_components():
    fields = [f.name for f in dataclasses.fields(Backbone)]
    assert fields[:2] == ["family", "components"]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(Backbone)[:5])
    with pytest.raises(TypeError):
        Backbone(vae=None, unet=None, text_encoder=None, tokenizer=None, scheduler_config={}, identity={},
                 device=torch.device("cpu"), dtype=torch.float32)
    parts = {"vae": "V", "text_encoder": "T", "tokenizer": "K", "scheduler_config": {"a": 1}}
    backbone = Backbone(FAMILIES["sd3"], parts, {}, torch.device("meta"), torch.float32)
    assert (backbone.vae, backbone.unet, backbone.text_encoder, backbone.tokenizer, backbone.scheduler_config) == (
        "V", None, "T", "K", {"a": 1})


def test_families_are_on_their_base_classes_and_name_their_tokenizers_one_way():
    assert list(FAMILIES) == ["sd", "sd2", "sdxl", "sd3", "flux"]
    for name in ("sd", "sd2", "sdxl"):
        assert isinstance(FAMILIES[name], UNetFamily)
    for name in ("sd3", "flux"):
        assert isinstance(FAMILIES[name], TransformerFamily)
    assert tuple(FAMILIES["sd"].tokenizers) == ("tokenizer",)
    assert tuple(FAMILIES["sdxl"].tokenizers) == ("tokenizer", "tokenizer_2")
    assert tuple(FAMILIES["sd3"].tokenizers) == ("tokenizer", "tokenizer_2", "tokenizer_3")
    assert tuple(FAMILIES["flux"].tokenizers) == ("tokenizer", "tokenizer_2")
    for family in FAMILIES.values():
        assert set(family.tokenizers) <= set(family.components)


@pytest.mark.parametrize(("module", "kept"), [
    ("refseg.extract.cli", "interrupted: the shards written so far are kept in X; to resume, run: the same command"),
    ("refseg.heads.cli_train", "interrupted: the epochs completed so far are kept in X; to resume, run: the same "
                               "command with --resume"),
    ("refseg.heads.cli_sweep", "interrupted: the heads' completed epochs are kept under X; to resume, run: the same "
                               "command"),
    ("refseg.study.cli", "interrupted: the caches and runs finished so far are kept under X; to resume, run: the "
                         "same command"),
    ("refseg.cache.cli", "interrupted: nothing was kept"),
    ("refseg.heads.cli_eval", "interrupted: nothing was kept")])
def test_what_ctrl_c_keeps_is_declared_by_each_command_module(module, kept):
    assert core_cli.interrupted_message(module, {"out": "X"}, None) == kept


def test_core_names_no_module_of_the_packages_above_it():
    source = inspect.getsource(core_cli)
    for package in ("refseg.extract", "refseg.heads", "refseg.study", "refseg.cache", "refseg.backbones"):
        assert package not in source
