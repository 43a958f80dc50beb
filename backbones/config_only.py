"""A backbone's shapes from its configuration files alone, no weights read.

`refseg-extract --dry-run` and the space check before a real run need the `FeatureSpec` (which
tensors, at which sizes), the text arrays' shapes, the family's defaults and the noise schedule: all
of these come from the components' configs. Loading SD1.5's weights for them takes seconds to
minutes (and hashes every weight); its configs load in under a second: each diffusers model is built
on PyTorch's meta device (no memory, no weights), so its `.config` is exactly the one a loaded model
has, defaults included, and each text encoder's config is read with transformers' `AutoConfig`.

The result is a `Backbone` whose modules are meta-device shells: it answers every shape question
(`spec`, `text_shape`, `pooled_dim`, `max_stride`, `noise_input`, ...) and nothing else (no identity,
no forward). `backbone_shapes` is None where the configs are not here to read: the built-in tiny models
(built in code, loading them is already instant), a hub id not in the local Hugging Face cache, a
single-file checkpoint without `--model-config`, or a folder the configs of which cannot be read (the
full load then says what is wrong, in its own words).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from refseg.backbones.families import tiny_names
from refseg.backbones.loading import TINY_SYNTH_DIR, Backbone, _folder_family, _refine

SCHEDULER = "scheduler"


def backbone_shapes(model: str, model_config: str | None = None) -> Backbone | None:
    """The shapes of `--model model` (with `--model-config`) from its configs; None when only loading it can tell."""
    folder = config_folder(str(model), model_config)
    if folder is None:
        return None
    try:
        return _from_folder(folder)
    except Exception:  # noqa: BLE001 - a folder the configs of which cannot be read: the full load names the fault
        return None


def config_folder(model: str, model_config: str | None) -> str | None:
    """The diffusers folder whose subfolders hold `model`'s configs, or None."""
    if model in tiny_names():
        return None
    if model == "tiny-synth":
        return str(TINY_SYNTH_DIR) if (TINY_SYNTH_DIR / "unet").is_dir() else None
    if os.path.isdir(model):
        return model
    if os.path.isfile(model):
        return model_config if model_config and os.path.isdir(model_config) else None
    return _cached_hub_folder(model)


def _cached_hub_folder(repo_id: str) -> str | None:
    """The local Hugging Face cache's snapshot of `repo_id` (never the network), or None."""
    try:
        # deferred: heavy, and only a model whose configs are on the machine needs it
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a hub id, or not cached: the full load decides
        return None


def _from_folder(folder: str) -> Backbone:
    family = _folder_family(folder)
    parts = {name: _component(folder, name) for name in family.components if name != SCHEDULER}
    parts["scheduler_config"] = _scheduler_config(folder)
    family = _refine(family, parts)
    return Backbone(family, parts, {}, torch.device("meta"), torch.float32)


def _component(folder: str, name: str):
    path = os.path.join(folder, name)
    if name.startswith("tokenizer"):
        return _tokenizer_shell(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if "_diffusers_version" in config:  # a diffusers model: built empty, its config holds every default
        # deferred: heavy, and only a model whose configs are on the machine needs it
        import diffusers

        with torch.device("meta"):
            return getattr(diffusers, config["_class_name"]).from_config(config)
    from transformers import AutoConfig  # a text encoder: only its config is read

    return SimpleNamespace(config=AutoConfig.from_pretrained(path, local_files_only=True))


def _tokenizer_shell(path: str) -> SimpleNamespace:
    """What shapes ask of a tokenizer: its `model_max_length` (SD3/FLUX's CLIP context length)."""
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        return SimpleNamespace(model_max_length=int(json.load(f)["model_max_length"]))


def _scheduler_config(folder: str) -> dict:
    from diffusers import DDPMScheduler  # load_config reads scheduler_config.json, whatever the class

    return dict(DDPMScheduler.load_config(folder, subfolder=SCHEDULER, local_files_only=True))
