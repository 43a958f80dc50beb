"""The settings of one extraction run: each field once, with its default and its `refseg-extract` help.

`extract/cli.py` generates its options from these fields (`refseg.core.options.dataclass_options`), so
a default is written here and nowhere else. No torch here: `refseg-extract --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import click

from refseg.core.cli import fail
from refseg.core.options import cli
from refseg.core.errors import RefsegError

MAX_NOISE_GROUP = 9999  # tNNNN: four digits (cache/layout.py)


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

    @staticmethod
    def to_text(value: tuple[int, ...]) -> str:  # as typed (refseg.core.cli.command_line)
        return ",".join(map(str, value))


class BlockList(click.ParamType):
    """`--blocks d07,x30` -> ("d07", "x30"); `''` -> () where `allow_empty` (ids are checked against the model)."""

    name = "text"

    def __init__(self, allow_empty: bool):
        self.allow_empty = allow_empty

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        values = tuple(v.strip() for v in value.split(",") if v.strip())
        if not values and not self.allow_empty:
            fail(f"{param.opts[0]} needs at least one block (e.g. j12 for SD3, d07 or x30 for FLUX)")
        return values

    @staticmethod
    def to_text(value: tuple[str, ...]) -> str:  # as typed (refseg.core.cli.command_line)
        return ",".join(value)


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
    image_root: str | None = field(default=None, metadata=cli("Folder of the images.", type=click.Path(),
                                                              show_default="the refer layout"))
    model: str = field(default="tiny", metadata=cli(
        "Hub id, local diffusers folder, single .safetensors/.ckpt file, 'tiny' or 'tiny-synth' (tiny random "
        "models of other families: tiny-sd2, tiny-sdxl, tiny-sd3, tiny-flux)."))
    model_config: str | None = field(default=None, metadata=cli(
        "Diffusers config folder for a single-file model (offline).", type=click.Path(), show_default="none"))
    # T is on SD's DDPM 0..999 scale for every family; a flow model runs at the σ of SD's SNR at T
    # (docs/DESIGN.md §5). The default 0 is dropped when only --noise-sigma is given (`with_preset`);
    # () with no σ either means (0,) (__post_init__).
    noise_ts: tuple[int, ...] = field(default=(0,), metadata=cli(
        "Noise level T (repeatable): 0, 5, 500 ...", flag="--noise-t", type=int, multiple=True))
    noise_sigmas: tuple[float, ...] = field(default=(), metadata=cli(
        "Flow-matching σ in [0, 1) (repeatable; SD3/FLUX; without --noise-t, only these); stored as the "
        "tNNNN of nearest SNR.", flag="--noise-sigma", type=float, multiple=True, show_default="none"))
    timestep: int | None = field(default=None, metadata=cli("UNet timestep.", show_default="T"))
    # "sd" (times vae scaling_factor) | "none" (VPD)
    latent_scaling: str = field(default="sd", metadata=cli(type=click.Choice(["sd", "none"])))
    noise_seed: int = 0
    out: str = field(metadata=cli("The cache store (CACHE.zarr).", type=click.Path()))
    batch_size: int = 4
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    dtype: str = field(default="auto", metadata=cli("auto: fp32 on CPU, bf16 on GPU.",
                                                    type=click.Choice(["auto", "fp32", "bf16", "fp16"])))
    image_size: int | None = field(default=None, metadata=cli(  # None: the backbone family's (extract/inputs.py)
        "Square side images are resized to.", type=int, show_default="the family's: 512 SD1.x, 768 SD2.x-v, 1024 SDXL"))
    token_length: int = field(default=40, metadata=cli("40 for RefCOCO/+, 77 for RefCOCOg."))
    limit: int | None = field(default=None, metadata=cli("Only the first N samples (sorted by image).",
                                                         show_default="all"))
    # "all" | "first" (the first sentence of each ref)
    sentences: str = field(default="all", metadata=cli(type=click.Choice(["all", "first"])))
    # None: the backbone family's defaults (SD1.x/2.x 8,16,32,64 and 16,32; SDXL 8,16,32 and 16,32)
    strides: tuple[int, ...] | None = field(default=None, metadata=cli(
        "Feature strides to store.", type=StrideList(allow_empty=False), show_default="the family's"))
    attn_strides: tuple[int, ...] | None = field(default=None, metadata=cli(
        "Cross-attention strides ('' for none).", type=StrideList(allow_empty=True), show_default="the family's"))
    # transformer families only (SD3, FLUX: every feature at stride 16, named by block: j12_s16, x23_s16)
    blocks: tuple[str, ...] | None = field(default=None, metadata=cli(
        "SD3/FLUX: blocks whose image tokens are stored, e.g. j12 (SD3), d07,x30 (FLUX double/single).",
        type=BlockList(allow_empty=False), show_default="the family's: 1/4, 1/2, 3/4 of the depth"))
    attn_blocks: tuple[str, ...] | None = field(default=None, metadata=cli(
        "SD3/FLUX: blocks whose text-token maps are stored ('' for none).", type=BlockList(allow_empty=True),
        show_default="--blocks, else the family's"))
    text_field: str = field(default="sent", metadata=cli(type=click.Choice(["sent", "raw"])))
    mask_rule: str = field(default="vpd", metadata=cli(type=click.Choice(["vpd", "union"])))
    shard_size: int | None = field(default=None, metadata=cli(  # None: the cache's default
        "Samples per Zarr shard (the unit of writing).", show_default="16; a store keeps its own"))
    codec: str = field(default="none", metadata=cli(type=click.Choice(["none", "zstd", "blosc"])))
    # fp32 doubles the disk; it keeps VPD's masks exact (README "Evaluate VPD's released checkpoint");
    # int8 halves the features (cache/quantize.py), latents and embeddings stay fp16
    cache_dtype: str = field(default="fp16", metadata=cli(
        "Storage type of latents, embeddings and features; int8: features as 8-bit codes with per-sample, "
        "per-channel scales (0.5x the disk), latents and embeddings fp16.", type=click.Choice(["fp16", "fp32", "int8"])))
    workers: int = field(default=0, metadata=cli("DataLoader workers decoding images."))
    wait_timeout: float = field(default=3600.0, metadata=cli(  # see Extraction.finish_stage_one
        "Seconds to wait for other processes' latents/embeddings before the UNet stage."))
    overwrite: bool = field(default=False, metadata=cli(
        "Replace an existing store with different settings (one with the same settings is resumed).",
        flag="--overwrite"))
    skip_bad: bool = field(default=False, metadata=cli(
        "Skip unreadable images / empty sentences, report them at the end.", flag="--skip-bad"))
    # "empty": every sample is encoded as the empty prompt, so the features of an image are the same for each
    # of its sentences: the no-sentence baseline (what the sentence adds through the backbone, not the head)
    prompt: str = field(default="sentence", metadata=cli(
        "What conditions the backbone: each sample's sentence, or the empty prompt (a no-sentence baseline; "
        "the index still holds the sentences, the GT their objects).", type=click.Choice(["sentence", "empty"])))
    dry_run: bool = field(default=False, metadata=cli(
        "Print what would be done (samples, images, noise levels and which are done, bytes per sample and per "
        "level, the store's size, the free space at --out) and write nothing.", flag="--dry-run"))
    no_space_check: bool = field(default=False, metadata=cli(
        "Start even when --out's file system reports too little free space for the store (one that "
        "misreports it).", flag="--no-space-check"))
    shard: tuple[int, int] = (0, 1)  # this process's part (i, n) of the shards
    progress: bool = True

    def __post_init__(self):
        if not self.noise_ts and not self.noise_sigmas:
            self.noise_ts = (0,)
        self.noise_ts, self.noise_sigmas = tuple(self.noise_ts), tuple(self.noise_sigmas)

    def check(self) -> None:
        """Refuse a numeric setting no extraction can use, before anything is read, loaded or written.

        What depends on the model (the largest feature stride, the text encoder's length, the noise
        schedule's steps) is checked by `check_for_model` once the backbone is loaded.
        """
        def at_least(flag: str, value, low) -> None:
            if value is not None and value < low:
                raise RefsegError(f"{flag} must be at least {low} (got {value})")

        if self.image_size is not None and self.image_size < 1:
            raise RefsegError(f"--image-size must be a positive multiple of the model's largest feature stride "
                              f"(64 for Stable Diffusion) (got {self.image_size})")
        at_least("--token-length", self.token_length, 2)  # the start and end tokens
        at_least("--batch-size", self.batch_size, 1)
        at_least("--limit", self.limit, 1)
        at_least("--shard-size", self.shard_size, 1)
        at_least("--workers", self.workers, 0)
        at_least("--timestep", self.timestep, 0)
        if any(not 0.0 <= s < 1.0 for s in self.noise_sigmas):  # also refuses NaN
            raise RefsegError(f"--noise-sigma takes flow-matching σ in [0, 1) (got {list(self.noise_sigmas)})")
        if any(not 0 <= t <= MAX_NOISE_GROUP for t in self.noise_ts):
            raise RefsegError(f"--noise-t takes steps of the model's noise schedule, 0..999 for Stable Diffusion "
                              f"(got {list(self.noise_ts)})")
        for flag, strides in (("--strides", self.strides), ("--attn-strides", self.attn_strides)):
            if strides is not None and any(s < 1 or s & (s - 1) for s in strides):
                raise RefsegError(f"{flag} takes powers of two like 8,16,32 (got {','.join(map(str, strides))})")
        if math.isnan(self.wait_timeout) or self.wait_timeout < 0:
            raise RefsegError(f"--wait-timeout must be 0 or more seconds (got {self.wait_timeout})")

    def layer_choices(self) -> dict:
        """The block choices given (transformer families), as `Backbone.spec` takes them; {} when none.
        Maps follow --blocks unless --attn-blocks is given. A UNet family refuses either in one line, and
        so does an id the transformer lacks (FeatureSpec.from_transformer)."""
        attn = self.attn_blocks if self.attn_blocks is not None else self.blocks
        return {k: tuple(v) for k, v in (("blocks", self.blocks), ("attn_blocks", attn)) if v is not None}

    def check_for_model(self, max_stride: int, max_tokens: int, schedule_steps: int) -> None:
        """The settings that depend on the loaded model: refused before any store is opened."""
        if self.image_size % max_stride:
            below = self.image_size // max_stride * max_stride
            nearest = " or ".join(str(v) for v in (below, below + max_stride) if v > 0)
            raise RefsegError(f"--image-size {self.image_size} is not a multiple of {max_stride}, the model's largest "
                              f"feature stride (try {nearest})")
        if self.token_length > max_tokens:
            raise RefsegError(f"--token-length {self.token_length} exceeds the text encoder's {max_tokens} positions")
        last = schedule_steps - 1
        if any(t > last for t in self.noise_ts):
            raise RefsegError(f"--noise-t must be in 0..{last} (the model's noise schedule has {schedule_steps} "
                              f"steps) (got {list(self.noise_ts)})")
        if self.timestep is not None and self.timestep > last:
            raise RefsegError(f"--timestep must be in 0..{last} (the model's noise schedule has {schedule_steps} "
                              f"steps) (got {self.timestep})")


# VPD (Zhao et al. 2023): no noise, UNet timestep 1, unscaled latents, 40 tokens, A32 attention.
PRESETS = {"vpd": {"noise_ts": (0,), "timestep": 1, "latent_scaling": "none", "token_length": 40,
                   "attn_strides": (16, 32)}}


def with_preset(cfg: ExtractionConfig, preset: str | None, explicit: set[str]) -> ExtractionConfig:
    """`cfg` with the named preset applied to the fields not in `explicit` (those the user set); and
    with --noise-t's default (T = 0) dropped when the user gave only --noise-sigma levels."""
    if cfg.noise_sigmas and "noise_ts" not in explicit:
        cfg = dataclasses.replace(cfg, noise_ts=())
    if preset is None:
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k not in explicit})
