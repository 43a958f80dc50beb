"""What one extraction reads: the samples it selects, their cache tables, the settings its fingerprint covers."""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

from refseg.backbones.loading import Backbone
from refseg.cache import layout
from refseg.cache.layout import CACHE_DTYPES, DEFAULT_CACHE_DTYPE, ImageTable, SampleTable
from refseg.core.errors import DataError, RefsegError
from refseg.core.noise import NoiseInput
from refseg.core.refer import ReferDataset
from refseg.extract.config import ExtractionConfig


def select_samples(refer: ReferDataset, split: str, sentences: str, limit: int | None):
    """The samples of a split in cache order: sorted by (image_id, sent_id), optionally first-sentence/limited."""
    samples = refer.samples(split)
    if sentences == "first":
        seen, firsts = set(), []
        for s in samples:
            if s.ref_id not in seen:
                seen.add(s.ref_id)
                firsts.append(s)
        samples = firsts
    samples = sorted(samples, key=lambda s: (s.image_id, s.sent_id))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DataError(f"split '{split}' of {refer.dataset} has no samples to extract")
    return samples


class SelectedTables(NamedTuple):
    """The cache's sample and image tables of the selected samples, and each image row's file path."""

    samples: SampleTable
    images: ImageTable
    image_paths: list[str]


def selected_tables(refer: ReferDataset, samples) -> SelectedTables:
    """`layout.build_tables` of `samples`, with the image sizes and paths read from `refer`."""
    orig_hw = {}
    for s in samples:
        if s.image_id not in orig_hw:
            info = refer.image(s.image_id)
            orig_hw[s.image_id] = (int(info["height"]), int(info["width"]))
    samples_table, images_table = layout.build_tables(samples, orig_hw)
    path_of = {s.image_id: str(s.image_path) for s in samples}
    return SelectedTables(samples_table, images_table, [path_of[int(i)] for i in images_table.image_id])


def count_truncated(tokenizer, texts: list[str], length: int) -> int:
    # verbose=False: these lengths are counted on purpose, no "longer than the maximum" warning
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    return sum(n > length for n in lengths)


def for_backbone(cfg: ExtractionConfig, backbone: Backbone) -> ExtractionConfig:
    """`cfg` with what it leaves to the backbone's family filled in: --image-size (SD1.x 512, SD2.x-v
    768, SDXL 1024), --strides and --attn-strides (the family's default layers)."""
    family = backbone.family
    return dataclasses.replace(
        cfg,
        image_size=backbone.default_image_size if cfg.image_size is None else cfg.image_size,
        strides=tuple(family.default_strides) if cfg.strides is None else tuple(cfg.strides),
        attn_strides=tuple(family.default_attn_strides) if cfg.attn_strides is None else tuple(cfg.attn_strides))


def noise_levels(cfg: ExtractionConfig, backbone: Backbone) -> list[NoiseInput]:
    """The noise levels of --noise-t and --noise-sigma as the backbone runs them, one per store group.

    A --noise-sigma level is stored in the group of the T of nearest SNR (refseg_core/noise.py); two
    levels that would share a group with different σ are refused (a group holds one noise level), the
    same level asked twice is kept once.
    """
    levels: dict[int, tuple[str, NoiseInput]] = {}
    asked = [(f"--noise-t {t}", dict(t=t)) for t in cfg.noise_ts] + \
            [(f"--noise-sigma {s:g}", dict(sigma=s)) for s in cfg.noise_sigmas]
    for what, kw in asked:
        noise = backbone.noise_input(timestep=cfg.timestep, **kw)
        if noise.level in levels:
            first, other = levels[noise.level]
            if other.model_timestep != noise.model_timestep or other.sigma != noise.sigma:
                raise RefsegError(f"{first} and {what} would both be stored as noise level t{noise.level:04d} "
                                  f"(σ {other.sigma:.6g} and {noise.sigma:.6g}): one store group holds one noise "
                                  "level; extract them into separate caches, or ask for one of them")
            continue
        levels[noise.level] = (what, noise)
    return [noise for _, noise in levels.values()]


def cache_settings(cfg: ExtractionConfig, backbone: Backbone) -> dict:
    """What the cache's fingerprint covers (noise levels excluded: they are groups inside one store)."""
    cfg = for_backbone(cfg, backbone)
    return {
        "backbone": dict(backbone.identity),
        "extraction": {
            "image_size": cfg.image_size,
            "token_length": cfg.token_length,
            "latent_scaling": cfg.latent_scaling,
            "noise_seed": cfg.noise_seed,
            "strides": sorted(cfg.strides),
            "attn_strides": sorted(cfg.attn_strides),
            # only when given: the stores of every other extraction keep their fingerprint
            **{k: sorted(v) for k, v in cfg.layer_choices().items()},
            "dtype": str(backbone.dtype).replace("torch.", ""),
            "text_field": cfg.text_field,
            "mask_rule": cfg.mask_rule,
            **({"prompt": cfg.prompt} if cfg.prompt != "sentence" else {}),  # only when given: fingerprints stay
            # only when not float16: float16 stores (all those made before the option) keep their fingerprint
            **({"cache_dtype": CACHE_DTYPES[cfg.cache_dtype]} if CACHE_DTYPES[cfg.cache_dtype] != DEFAULT_CACHE_DTYPE
               else {}),
        },
        "dataset": {
            "data_root": os.path.abspath(cfg.data_root),
            "dataset": cfg.dataset,
            "split_by": cfg.split_by,
            "split": cfg.split,
            "image_root": os.path.abspath(cfg.image_root) if cfg.image_root else None,
            "sentences": cfg.sentences,
            "limit": cfg.limit,
        },
    }
