"""The settings of training and evaluation: one source for every default of the Python API
(`train`, `evaluate`, `predict`) and of the commands (`refseg-train-head`, `refseg-eval`), whose
options are generated from these fields (`refseg.core.cli.dataclass_options`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import click

from refseg.core.cli import cli
from refseg.core.errors import RefsegError
from refseg.heads import run_dir
from refseg.heads.losses import LOSSES
from refseg.heads.registry import HEADS, head_names

OPTIMIZERS = {  # name: (default lr, weight decay, poly decay)
    "adamw": (5e-5, 1e-2, True),
    "adam": (1e-4, 0.0, False),
}
POLY_POWER = 0.9
PROTOCOLS = ("vpd", "original")
NOISE_T_RANGE = (0, 9999)  # a cache stores noise level T in group tNNNN (cache/layout.py)
SEED_RANGE = (0, 2**32 - 1)  # EpochShuffle seeds a generator with seed * 1_000_003 + epoch: keep it in int64
# Upper bounds that stop a typo before it allocates or forks without limit: a vpd decoder 4096 wide
# (VPD's is 640) already takes ~10 GB of weights and optimizer state; 64 DataLoader processes is
# far beyond what feeding a head needs.
HIDDEN_MAX = 4096
WORKERS_MAX = 64
INCOMPLETE_HELP = ("Use a noise level whose extraction is unfinished (only its done samples); the coverage is "
                   "recorded in the results.")


@dataclass
class TrainSettings:
    """One training run. `cache` and `val_cache` may also be opened caches (Python API)."""

    cache: str = field(metadata=cli("Training cache (CACHE.zarr).", type=click.Path()))
    noise_t: int = field(metadata=cli("Noise level T to train on (a group of the cache)."))
    head: str = field(metadata=cli("Head to train.", type=click.Choice(head_names())))
    out: str = field(metadata=cli("Run directory (new or empty, or with --resume).", type=click.Path()))
    val_cache: str | None = field(default=None, metadata=cli(
        "Val cache: metrics every epoch and best.safetensors selected on its oIoU (as VPD/LAVT).",
        type=click.Path()))
    epochs: int = 10
    batch_size: int = field(default=8, metadata=cli(
        "Samples per optimizer step (under torchrun: in all, split across the ranks)."))
    lr: float | None = field(default=None, metadata=cli("Learning rate [default: 5e-5 adamw, 1e-4 adam]."))
    optimizer: str = field(default="adamw", metadata=cli(
        "adamw: wd 1e-2 + poly decay per iteration (VPD); adam: constant lr.", type=click.Choice(list(OPTIMIZERS))))
    loss: str = field(default="ce", metadata=cli(
        "Cross-entropy with class weights [0.9, 1.1] (VPD), optionally plus Dice.", type=click.Choice(list(LOSSES))))
    hidden: int = field(default=640, metadata=cli("Decoder width of vpd/film."))
    seed: int = field(default=0, metadata=cli("Same seed, same weights."))
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    workers: int = field(default=0, metadata=cli("DataLoader worker processes."))
    preload: bool | None = field(default=None, metadata=cli(  # None (or "auto"): decided by the free RAM
        "Load the samples into RAM first (checked to fit). Default: when they take under half the free RAM."))
    resume: bool = field(default=False, metadata=cli("Continue RUN from its last completed epoch.", flag="--resume"))
    eval_every: int = field(default=1, metadata=cli("Validate every N epochs (and last)."))
    max_samples: int | None = field(default=None, metadata=cli("Train on the first N finished samples only."))
    allow_incomplete: bool = field(default=False, metadata=cli(INCOMPLETE_HELP, flag="--allow-incomplete"))

    def __post_init__(self):
        self.noise_t, self.out = int(self.noise_t), Path(self.out)

    @classmethod
    def from_keywords(cls, **options) -> tuple[TrainSettings, dict]:
        """`train()`'s keywords -> (settings, the rest: the head's own arguments, tensors=, text_hidden=...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        head_args = {k: v for k, v in options.items() if k not in names}
        return cls(**{k: v for k, v in options.items() if k in names}), head_args

    def check(self) -> None:
        """The settings a command line cannot rule out (the Python API takes any value): one-line errors."""
        if self.head not in HEADS:
            raise RefsegError(f"unknown head {self.head!r} (available: {', '.join(head_names())})")
        if self.optimizer not in OPTIMIZERS:
            raise RefsegError(f"unknown optimizer {self.optimizer!r} (choose {' or '.join(OPTIMIZERS)})")
        if self.loss not in LOSSES:
            raise RefsegError(f"unknown loss {self.loss!r} (choose {' or '.join(LOSSES)})")
        require_int("--noise-t", self.noise_t, *NOISE_T_RANGE)
        require_int("--epochs", self.epochs, 1)
        require_int("--batch-size", self.batch_size, 1)
        require_int("--hidden", self.hidden, 1, HIDDEN_MAX)
        require_int("--workers", self.workers, 0, WORKERS_MAX)
        require_int("--eval-every", self.eval_every, 1)
        require_int("--seed", self.seed, *SEED_RANGE)
        if self.max_samples is not None:
            require_int("--max-samples", self.max_samples, 1)
        if self.lr is not None:
            require_positive("--lr", self.lr)

    def optimization(self) -> tuple[float, float, bool]:
        """(learning rate, weight decay, poly decay): the optimizer's defaults unless `lr` is given."""
        default_lr, weight_decay, poly = OPTIMIZERS[self.optimizer]
        return (float(self.lr) if self.lr is not None else default_lr), weight_decay, poly


@dataclass
class EvalSettings:
    """Which weights of a run, on which cache, scored how, written where. `predict` reads the first part."""

    run: str = field(metadata=cli("Run directory written by refseg-train-head.", type=click.Path()))
    cache: str = field(metadata=cli("Cache to evaluate on.", type=click.Path()))
    noise_t: int | None = field(default=None, metadata=cli("Noise level [default: the run's]."))
    allow_noise_mismatch: bool = field(default=False, metadata=cli(
        "Evaluate at a noise level other than the run's (transfer studies).", flag="--allow-noise-mismatch"))
    protocol: str = field(default="vpd", metadata=cli(
        "vpd: S x S vs the cached GT (LAVT/VPD); original: original size vs the union GT.",
        type=click.Choice(PROTOCOLS)))
    data_root: str | None = field(default=None, metadata=cli(
        "Dataset root for --protocol original and --overlays [default: the cache's].", type=click.Path()))
    checkpoint: str = field(default="best", metadata=cli(
        "best = best val oIoU during training (last when trained without val).",
        type=click.Choice(sorted(run_dir.CHECKPOINTS))))
    json_out: str | None = field(default=None, metadata=cli(
        "Write summary + run/cache info as JSON.", flag="--json", type=click.Path()))
    per_sample: str | None = field(default=None, metadata=cli(
        "Write sent_id,ref_id,iou,i,u per sentence.", type=click.Path()))
    overlays: str | None = field(default=None, metadata=cli(
        "Write overlay PNGs (GT green, prediction red).", type=click.Path()))
    max_overlays: int = 16
    batch_size: int = 16
    device: str = "auto"
    allow_incomplete: bool = field(default=False, metadata=cli(INCOMPLETE_HELP, flag="--allow-incomplete"))

    PREDICT = ("checkpoint", "device", "batch_size", "allow_noise_mismatch", "allow_incomplete")  # what `predict` takes

    def check(self) -> None:
        """One-line errors for values the command line lets through (and any the Python API is given)."""
        if self.protocol not in PROTOCOLS:
            raise RefsegError(f"unknown protocol {self.protocol!r} (choose {' or '.join(PROTOCOLS)})")
        if self.checkpoint not in run_dir.CHECKPOINTS:
            raise RefsegError(f"unknown checkpoint {self.checkpoint!r} (choose best or last)")
        if self.noise_t is not None:
            require_int("--noise-t", self.noise_t, *NOISE_T_RANGE)
        require_int("--batch-size", self.batch_size, 1)
        require_int("--max-overlays", self.max_overlays, 0)


def require_int(option: str, value, low: int, high: int | None = None) -> None:
    """A RefsegError naming `option` unless `value` is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RefsegError(f"{option} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RefsegError(f"{option} must be {allowed}, got {value}")


def require_positive(option: str, value) -> None:
    """A RefsegError naming `option` unless `value` is a finite number above 0 (nan, inf, 0 and below are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise RefsegError(f"{option} must be a finite number above 0, got {value!r}")
