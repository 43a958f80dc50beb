"""The settings of one extraction run: each field once, with its default and its `refseg-extract` help.

`extract/cli.py` generates its options from these fields (`refseg.core.cli.dataclass_options`), so
a default is written here and nowhere else. No torch here: `refseg-extract --help` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import click

from refseg.core.cli import cli, fail
from refseg.core.feature_spec import DEFAULT_ATTN_STRIDES, DEFAULT_STRIDES


class StrideList(click.ParamType):
    """`--strides 8,16,32` -> (8, 16, 32); `''` -> () where `allow_empty`.

    A bad value is one line on stderr and exit 2 (`fail`), as every refseg user error, rather than
    click's usage block.
    """

    name = "text"  # --help shows TEXT: what the user types

    def __init__(self, allow_empty: bool):
        self.allow_empty = allow_empty

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):  # a field's default
            return value
        flag = param.opts[0]
        try:
            values = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            fail(f"{flag} takes comma-separated integers like 8,16,32 (got '{value}')")
        if not values and not self.allow_empty:
            fail(f"{flag} needs at least one stride")
        return values


@dataclass(kw_only=True)  # required fields sit among the others, in --help's order
class ExtractionConfig:
    """Every setting of one extraction run.

    `refseg-extract` has an option for each field, in this order, except `shard` and `progress`
    (extract/cli.py: `--shard` also reads torchrun's variables, `--quiet` is `not progress`).
    """

    data_root: str = field(metadata=cli("Folder holding <dataset>/refs(<split-by>).p.", type=click.Path()))
    dataset: str = field(metadata=cli("refcoco, refcoco+, refcocog, refcoco-synth, ..."))
    split_by: str = "unc"
    split: str = field(metadata=cli("train, val, testA, testB, test, ..."))
    image_root: str | None = field(default=None, metadata=cli("Folder of the images (default: the refer layout).",
                                                              type=click.Path()))
    model: str = field(default="tiny", metadata=cli(
        "Hub id, local diffusers folder, single .safetensors/.ckpt file, 'tiny' or 'tiny-synth'."))
    model_config: str | None = field(default=None, metadata=cli(
        "Diffusers config folder for a single-file model (offline).", type=click.Path()))
    noise_ts: tuple[int, ...] = field(default=(0,), metadata=cli(
        "Noise level T (repeatable): 0, 5, 500 ...", flag="--noise-t", type=int, multiple=True, show_default=False))
    timestep: int | None = field(default=None, metadata=cli("UNet timestep (default: T)."))
    # "sd" (times vae scaling_factor) | "none" (VPD)
    latent_scaling: str = field(default="sd", metadata=cli(type=click.Choice(["sd", "none"])))
    noise_seed: int = 0
    out: str = field(metadata=cli("The cache store (CACHE.zarr).", type=click.Path()))
    batch_size: int = 4
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    dtype: str = field(default="auto", metadata=cli("auto: fp32 on CPU, bf16 on GPU.",
                                                    type=click.Choice(["auto", "fp32", "bf16", "fp16"])))
    image_size: int = 512
    token_length: int = field(default=40, metadata=cli("40 for RefCOCO/+, 77 for RefCOCOg."))
    limit: int | None = field(default=None, metadata=cli("Only the first N samples (sorted by image)."))
    # "all" | "first" (the first sentence of each ref)
    sentences: str = field(default="all", metadata=cli(type=click.Choice(["all", "first"])))
    strides: tuple[int, ...] = field(default=DEFAULT_STRIDES, metadata=cli(
        "Feature strides to store.", type=StrideList(allow_empty=False)))
    attn_strides: tuple[int, ...] = field(default=DEFAULT_ATTN_STRIDES, metadata=cli(
        "Cross-attention strides ('' for none).", type=StrideList(allow_empty=True)))
    text_field: str = field(default="sent", metadata=cli(type=click.Choice(["sent", "raw"])))
    mask_rule: str = field(default="vpd", metadata=cli(type=click.Choice(["vpd", "union"])))
    shard_size: int | None = field(default=None, metadata=cli(  # None: the cache's default
        "Samples per Zarr shard (the unit of writing)."))
    codec: str = field(default="none", metadata=cli(type=click.Choice(["none", "zstd", "blosc"])))
    workers: int = field(default=0, metadata=cli("DataLoader workers decoding images."))
    wait_timeout: float = field(default=3600.0, metadata=cli(  # see Extraction.finish_stage_one
        "Seconds to wait for other processes' latents/embeddings before the UNet stage."))
    overwrite: bool = field(default=False, metadata=cli(
        "Replace an existing store with different settings (one with the same settings is resumed).",
        flag="--overwrite"))
    skip_bad: bool = field(default=False, metadata=cli(
        "Skip unreadable images / empty sentences, report them at the end.", flag="--skip-bad"))
    shard: tuple[int, int] = (0, 1)  # this process's part (i, n) of the shards
    progress: bool = True


# VPD (Zhao et al. 2023): no noise, UNet timestep 1, unscaled latents, 40 tokens, A32 attention.
PRESETS = {"vpd": {"noise_ts": (0,), "timestep": 1, "latent_scaling": "none", "token_length": 40,
                   "attn_strides": (16, 32)}}


def with_preset(cfg: ExtractionConfig, preset: str | None, explicit: set[str]) -> ExtractionConfig:
    """`cfg` with the named preset applied to the fields not in `explicit` (those the user set)."""
    if preset is None:
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k not in explicit})
