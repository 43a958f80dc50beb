"""The extraction resolved once: the settings with the backbone family's defaults filled in, the
`FeatureSpec`, the noise levels, the record the store's fingerprint covers and the text arrays' layout.

`resolve_extraction(cfg, backbone)` is the one place that asks the backbone what the settings leave
open. `run_extraction`, the plan (extract/plan.py, also from a backbone built from its configs alone:
backbones/config_only.py) and the report read its result; `ResolvedExtraction.new_store` is what
`CacheWriter.open` creates a store from, or checks the store there against.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from refseg.backbones.loading import Backbone
from refseg.cache.layout import CACHE_DTYPES, DEFAULT_CACHE_DTYPE, DEFAULT_SHARD_SIZE
from refseg.cache.opening import NewStore
from refseg.core.errors import RefsegError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.noise import NoiseInput
from refseg.extract.config import ExtractionConfig
from refseg.extract.inputs import SelectedTables


@dataclass(frozen=True)
class ResolvedExtraction:
    """One extraction as the backbone runs it; built by `resolve_extraction`."""

    cfg: ExtractionConfig  # --image-size, --strides and --attn-strides filled in (the family's where not given)
    spec: FeatureSpec  # every tensor the store holds per sample and noise level
    levels: tuple[NoiseInput, ...]  # one per store group (tNNNN), in the order asked
    # what the fingerprint covers beside the spec and the samples (noise levels excluded: they are groups
    # inside one store); its backbone part is empty for a backbone built from configs alone (the plan's)
    extraction_record: dict
    text_shape: tuple[int, int] | None  # the text context where the family's is not (token_length, text_dim)
    pooled_dim: int | None  # the pooled text embedding (SDXL, SD3, FLUX); None: none stored

    @property
    def level_keys(self) -> tuple[int, ...]:
        """The store group (T) of each noise level."""
        return tuple(noise.level for noise in self.levels)

    @property
    def text_layout(self) -> dict:
        """The text arrays' layout, as `layout.base_arrays` takes it (None: SD's)."""
        return {"text_shape": self.text_shape, "pooled_dim": self.pooled_dim}

    def new_store(self, tables: SelectedTables, dataset_sha256: str | None) -> NewStore:
        """What `CacheWriter.open` creates, or resumes when the store there has the same fingerprint."""
        return NewStore(spec=self.spec, extraction_record=self.extraction_record, samples=tables.samples,
                        images=tables.images, shard_size=self.cfg.shard_size or DEFAULT_SHARD_SIZE,
                        codec=self.cfg.codec, dataset_sha256=dataset_sha256, text_shape=self.text_shape,
                        pooled_dim=self.pooled_dim)


def resolve_extraction(cfg: ExtractionConfig, backbone: Backbone) -> ResolvedExtraction:
    """`cfg` on `backbone`: the settings that depend on the model are checked here, before any store is
    opened (image size against the largest stride, token length, noise levels against the schedule)."""
    cfg = _filled_in(cfg, backbone)
    cfg.check_for_model(backbone.max_stride, backbone.max_token_length, backbone.schedule_steps)
    spec = backbone.spec(cfg.image_size, cfg.token_length, cfg.strides, cfg.attn_strides, **cfg.layer_choices())
    levels = tuple(noise_levels(cfg, backbone))  # refused here when ambiguous
    shape = tuple(backbone.text_shape(spec.token_length))
    return ResolvedExtraction(cfg, spec, levels, _extraction_record(cfg, backbone),
                              text_shape=None if shape == (spec.token_length, spec.text_dim) else shape,
                              pooled_dim=backbone.pooled_dim)


def _filled_in(cfg: ExtractionConfig, backbone: Backbone) -> ExtractionConfig:
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


def _extraction_record(cfg: ExtractionConfig, backbone: Backbone) -> dict:
    """What the cache's fingerprint covers of the run (`cfg` filled in): the backbone's identity, the
    extraction settings and the dataset selection.

    A setting added to the record after stores existed enters it only when it is not its default, so
    every store made without it keeps its fingerprint: the layer choices, --prompt, --cache-dtype.
    """
    return {
        "backbone": dict(backbone.identity),
        "extraction": {
            "image_size": cfg.image_size,
            "token_length": cfg.token_length,
            "latent_scaling": cfg.latent_scaling,
            "noise_seed": cfg.noise_seed,
            "strides": sorted(cfg.strides),
            "attn_strides": sorted(cfg.attn_strides),
            **{k: sorted(v) for k, v in cfg.layer_choices().items()},
            "dtype": str(backbone.dtype).replace("torch.", ""),
            "text_field": cfg.text_field,
            "mask_rule": cfg.mask_rule,
            **({"prompt": cfg.prompt} if cfg.prompt != "sentence" else {}),
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
