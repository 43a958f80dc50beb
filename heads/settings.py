"""The settings of training, evaluation, sweeps and comparisons: one source for every default of the
Python API (`train`, `evaluate`, `predict`, `run_sweep`, `compare`) and of the commands
(`refseg-train-head`, `refseg-eval`, `refseg-sweep`, `refseg-compare`), whose options are generated
from these fields (`refseg.core.options.dataclass_options`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import click

from refseg.core.options import cli
from refseg.core.errors import RefsegError
from refseg.core.paths import check_writable
from refseg.heads import run_dir
from refseg.heads.losses import LOSSES
from refseg.heads.registry import HEADS, head_names

OPTIMIZERS = {  # name: (default lr, weight decay, poly decay)
    "adamw": (5e-5, 1e-2, True),
    "adam": (1e-4, 0.0, False),
}
POLY_POWER = 0.9
PROTOCOLS = ("vpd", "original")
HEAD_DTYPES = ("auto", "fp32")  # how a head runs in evaluation: heads.batches.autocast
# refseg-eval's batch; training's validation scores in batches of it too, so that the val metrics a run
# logs are what refseg-eval prints for that epoch's weights (heads/scoring.py)
EVAL_BATCH_SIZE = 16
NOISE_T_RANGE = (0, 9999)  # a cache stores noise level T in group tNNNN (cache/layout.py)
SEED_RANGE = (0, 2**32 - 1)  # EpochShuffle seeds a generator with data_seed * 1_000_003 + epoch: keep it in int64
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
    lr: float | None = field(default=None, metadata=cli(
        "Learning rate [default: 5e-5 adamw, 1e-4 adam: VPD's, for long runs; a short run (a few epochs, small "
        "heads, as the demo's) learns with --optimizer adam --lr 1e-3]."))
    optimizer: str = field(default="adamw", metadata=cli(
        "adamw: wd 1e-2 + poly decay per iteration (VPD); adam: constant lr.", type=click.Choice(list(OPTIMIZERS))))
    loss: str = field(default="ce", metadata=cli(
        "Cross-entropy with class weights [0.9, 1.1] (VPD), optionally plus Dice.", type=click.Choice(list(LOSSES))))
    hidden: int = field(default=640, metadata=cli("Decoder width of vpd/film."))
    seed: int = field(default=0, metadata=cli("Seed of the head's initial weights: same seeds, same weights."))
    # Why apart from `seed`: the heads of one sweep share every batch (one read feeds K heads), so their
    # data order cannot follow each head's init seed. The order is seeded by `data_seed` alone; a
    # config.json without data_seed is a run whose order was seeded by its `seed` (train_setup.ABSENT_KEYS).
    data_seed: int = field(default=0, metadata=cli(
        "Seed of the data order (each epoch's shuffle), apart from --seed: heads of one sweep share it."))
    text_blind: bool = field(default=False, metadata=cli(
        "Text-blind baseline: the head gets no sentence (a zero embedding, every token valid) and no attention "
        "maps; the features were still computed with the sentence.", flag="--text-blind"))
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    workers: int = field(default=0, metadata=cli("DataLoader worker processes."))
    preload: bool | None = field(default=None, metadata=cli(  # None (or "auto"): decided by the free RAM
        "Load the samples into RAM first (checked to fit). Default: when they take under half the free RAM."))
    resume: bool = field(default=False, metadata=cli("Continue RUN from its last completed epoch.", flag="--resume"))
    eval_every: int = field(default=1, metadata=cli("Validate every N epochs (and last)."))
    max_samples: int | None = field(default=None, metadata=cli("Train on the first N finished samples only."))
    allow_incomplete: bool = field(default=False, metadata=cli(INCOMPLETE_HELP, flag="--allow-incomplete"))
    tensorboard: bool = field(default=False, metadata=cli(
        "Log train loss, lr and val metrics per epoch to RUN/tb/ (pip install refseg[tensorboard]).",
        flag="--tensorboard"))

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
        require_int("--data-seed", self.data_seed, *SEED_RANGE)
        if self.max_samples is not None:
            require_int("--max-samples", self.max_samples, 1)
        if self.lr is not None:
            require_positive("--lr", self.lr)
        for option, value in (("--text-blind", self.text_blind), ("--tensorboard", self.tensorboard)):
            if not isinstance(value, bool):
                raise RefsegError(f"{option} must be true or false, got {value!r}")

    def optimization(self) -> tuple[float, float, bool]:
        """(learning rate, weight decay, poly decay): the optimizer's defaults unless `lr` is given."""
        default_lr, weight_decay, poly = OPTIMIZERS[self.optimizer]
        return (float(self.lr) if self.lr is not None else default_lr), weight_decay, poly


@dataclass
class EvalSettings:
    """Which weights of a run, on which cache, scored how, written where. `predict` reads the first part."""

    OVERLAY_PICKS = ("first", "best", "worst")  # which K samples --overlays draws

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
        "Write sent_id,ref_id,iou,i,u,image_id,sentence per sentence (CSV).", type=click.Path()))
    overlays: str | None = field(default=None, metadata=cli(
        "Write overlay PNGs (GT white outline, prediction cyan hatched).", type=click.Path()))
    max_overlays: int = 16
    overlay_pick: str = field(default="first", metadata=cli(
        "Which samples --overlays draws: the K (--max-overlays) of highest or lowest IoU, or the first K.",
        type=click.Choice(OVERLAY_PICKS)))
    overlay_ids: str | None = field(default=None, metadata=cli(
        "Draw these sent_ids only (comma-separated, e.g. 3,17,42), in that order."))
    batch_size: int = EVAL_BATCH_SIZE
    device: str = "auto"
    head_dtype: str = field(default="auto", metadata=cli(
        "auto: bf16 autocast on GPU, fp32 on CPU; fp32: fp32 on GPU too (exact masks, e.g. against VPD).",
        type=click.Choice(HEAD_DTYPES)))
    allow_incomplete: bool = field(default=False, metadata=cli(INCOMPLETE_HELP, flag="--allow-incomplete"))

    PREDICT = ("checkpoint", "device", "batch_size", "allow_noise_mismatch", "allow_incomplete",
               "head_dtype")  # what `predict` takes

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
        if self.head_dtype not in HEAD_DTYPES:
            raise RefsegError(f"unknown --head-dtype {self.head_dtype!r} (choose {' or '.join(HEAD_DTYPES)})")
        if self.overlay_pick not in self.OVERLAY_PICKS:
            raise RefsegError(f"unknown --overlay-pick {self.overlay_pick!r} (choose {', '.join(self.OVERLAY_PICKS)})")
        if self.overlay_ids is not None and self.overlay_pick != "first":
            raise RefsegError("give --overlay-ids or --overlay-pick, not both")
        if (self.overlay_ids is not None or self.overlay_pick != "first") and not self.overlays:
            raise RefsegError("--overlay-ids and --overlay-pick need --overlays DIR")
        self.overlay_sent_ids()  # a malformed list fails here, before anything is read

    def overlay_sent_ids(self) -> tuple[int, ...] | None:
        """--overlay-ids as sent_ids (None when not given); one-line error on anything but numbers."""
        if self.overlay_ids is None:
            return None
        parts = [p.strip() for p in str(self.overlay_ids).split(",")]
        if not all(p.isdigit() for p in parts):
            raise RefsegError(f"--overlay-ids takes comma-separated sent_ids such as 3,17,42 "
                              f"(got {self.overlay_ids!r})")
        return tuple(dict.fromkeys(int(p) for p in parts))


@dataclass
class SweepSettings:
    """A sweep of heads (heads/sweep.py). `grid` may also be the grid itself, a mapping (Python API)."""

    cache: str = field(metadata=cli("Training cache (CACHE.zarr).", type=click.Path()))
    val_cache: str = field(metadata=cli(
        "Val cache: every head's metrics per epoch, its best epoch selected on oIoU.", type=click.Path()))
    grid: str = field(metadata=cli(
        "GRID.yaml: refseg-train-head options in snake case; a list is a swept axis, a scalar fixed.",
        type=click.Path()))
    out: str = field(metadata=cli(
        "Sweep directory: DIR/runs/<name>/, DIR/summary.csv, DIR/summary.md. Rerun to resume.", type=click.Path()))
    data_seed: int = field(default=0, metadata=cli(
        "Seed of the data order shared by every head (each head's --seed seeds its init)."))
    processes: int = field(default=1, metadata=cli(
        "Local CPU processes that split the heads, each with threads/P torch threads (for long sweeps of small "
        "heads; BENCHMARKS.md, Sweep); each head equals its solo run with --threads threads/P."))
    dry_run: bool = field(default=False, metadata=cli(
        "Print the plan (heads, passes, memory per head and pass) and write nothing.", flag="--dry-run"))

    def check(self) -> None:
        require_int("--data-seed", self.data_seed, *SEED_RANGE)


@dataclass
class CompareSettings:
    """Runs side by side (heads/compare.py): `runs` are run or sweep directories (the command's arguments)."""

    runs: tuple
    caches: tuple = field(default=(), metadata=cli(
        "Evaluate every run on this cache (repeat: val, testA, testB); columns per cache. Without it: each run's "
        "recorded best val metrics.", flag="--cache", type=click.Path(), multiple=True, show_default=False))
    out: str | None = field(default=None, metadata=cli(
        "Also write the table to FILE.md or FILE.csv.", type=click.Path()))
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ... (with --cache)."))

    def check(self) -> None:
        """--out must name a Markdown or CSV file this process can write."""
        if self.out is not None:
            if Path(self.out).suffix.lower() not in (".md", ".csv"):
                raise RefsegError(f"--out {self.out} must end in .md or .csv")
            check_writable(self.out, "--out")


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
