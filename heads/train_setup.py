"""Everything training does before its first step, apart from the loop (as DINOv2 splits the set-up
of a linear evaluation from its loop): checks, data, the head, config.json, the run directory and
resuming. `set_up` returns the `TrainState` the loop in heads/train.py reads and advances.

`set_up_heads` sets up K heads on one batch stream (a sweep, heads/sweep.py): the settings that make
the stream (`STREAM_KEYS`: cache, noise level, batch size, data seed, ...) are the same for all, and
one dataset reads the union of the tensors they read; each head has its own run directory, seed,
optimizer, schedule and position. `set_up` is the case K = 1 (`refseg-train-head`).

The order of the steps is part of the result: each head is initialised under its seed right before
it is built, nothing between draws random numbers that reach the weights, and a resumed run restores
the random state last.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import refseg.core
from refseg.cache import FeatureDataset, open_cache
from refseg.cache.store import Coverage
from refseg.core.cli import warn
from refseg.core.device import resolve_device
from refseg.core.errors import CacheError, RefsegError, RunError
from refseg.core.memory import available_memory
from refseg.heads import run_dir
from refseg.heads.batches import make_loader, remove_sentence
from refseg.heads.caches import as_cache, check_compatible, refuse_incomplete, refuse_shared_samples
from refseg.heads.distributed import RankBatches, Ranks
from refseg.heads.losses import CLASS_WEIGHTS
from refseg.core.paths import check_writable, make_dirs, remove_empty
from refseg.heads.registry import HEADS, build_head
from refseg.heads.settings import POLY_POWER, TrainSettings

RESUME_KEYS = ("head", "head_args", "text_blind", "noise_t", "seed", "data_seed", "optimizer", "lr", "loss",
               "batch_size", "max_samples")
# What a config.json without the key means: the data order was seeded by the run's seed; not text-blind.
ABSENT_KEYS = {"data_seed": lambda config: config.get("seed"), "text_blind": lambda config: False}
# The settings that make a batch stream: heads set up together (a sweep) share them, and each batch.
STREAM_KEYS = ("cache", "val_cache", "noise_t", "batch_size", "data_seed", "max_samples", "device", "workers",
               "preload", "allow_incomplete")


class EpochShuffle(torch.utils.data.Sampler):
    """A fresh permutation per epoch, drawn from a generator seeded by (seed, epoch): reproducible
    and independent of how many epochs ran before in this process (so resuming changes nothing).
    Training passes `--data-seed` (not the head's `--seed`), so the heads of a sweep can share it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class HeadState:
    """One head in training: what the per-batch step and the end of an epoch read and update.

    The loop holds one; a sweep that trains K heads on the same batches holds K.
    """

    settings: TrainSettings  # its own: head, seed, lr, epochs, ... (the stream's keys are the state's)
    model: torch.nn.Module  # the head: what is saved and validated
    trained: torch.nn.Module  # what the step calls: the head, or DDP around it under torchrun
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]  # the learning rate of optimizer step `iteration`
    out: Path  # its run directory
    parameters: int
    best_oiou: float | None = None  # the best val oIoU so far (best.safetensors)
    epoch: int = 0  # the last completed epoch
    iteration: int = 0  # optimizer steps taken
    run_lock: run_dir.RunLock | None = None  # rank 0's hold on the run directory (released when training ends)
    tensorboard: object = None  # its SummaryWriter, opened at the first epoch's end (--tensorboard)
    failed: str | None = None  # why a head of a sweep stopped (it diverged); the others go on

    def release(self) -> None:
        """The run directory is free for the next trainer (or --resume); the TensorBoard file is closed."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None


@dataclass
class TrainState:
    """What the loop reads and advances: the data every head shares, and the heads."""

    settings: TrainSettings  # the batch stream's (STREAM_KEYS; the first head's settings)
    heads: list[HeadState]
    ranks: Ranks
    device: torch.device
    batches: RankBatches  # this rank's share of each global batch of the epoch's permutation
    loader: torch.utils.data.DataLoader
    n_samples: int  # in the training set (all ranks together)
    val_set: FeatureDataset | None  # rank 0 only
    progress: bool
    coverage: dict | None = None  # {"cache": ..., "val_cache": ...}: how much of the noise level each holds
    # per head, the folders set-up made for its run and whether the run is new (not resumed): what a
    # training that fails before its first epoch takes away again (`abandon_untrained`)
    made: list = field(default_factory=list)
    labelled: bool = False  # each head's lines start with its run's name (several heads, or a sweep's pass)
    _non_finite: dict | None = None  # tensor -> (row, sent_id) of its first non-finite sample, once looked for

    @property
    def head(self) -> HeadState:
        """The head of a one-head state (`refseg-train-head`)."""
        return self.heads[0]

    def non_finite_input(self, head: HeadState) -> tuple[int, str] | None:
        """(sent_id, tensor) of the first training sample whose inputs to `head` are not finite, or None.
        The training set is read once, at the first call: only a run whose loss is not finite asks."""
        if self._non_finite is None:
            self._non_finite = first_non_finite(self.loader.dataset)
        names = list(head.model.tensor_names) + (["text/embedding"] if reads_text(head.settings, head.model) else [])
        found = sorted((self._non_finite[name], name) for name in names if name in self._non_finite)
        return None if not found else (found[0][0][1], found[0][1])

    def say(self, message: str) -> None:
        progress_line(message, self.progress)

    def release(self) -> None:
        for head in self.heads:
            head.release()


@dataclass
class Samples:
    """A cache and its rows used: those finished at the noise level."""

    cache: object
    path: Path
    rows: np.ndarray
    coverage: Coverage  # of the whole noise level, whatever part of it `rows` takes


def set_up(s: TrainSettings, head_args: dict, progress: bool = True) -> TrainState:
    """Checks, data, head, run directory, optimizer and (with `resume`) the state to continue from."""
    return set_up_heads([(s, head_args)], progress)


def set_up_heads(runs: list[tuple[TrainSettings, dict]], progress: bool = True, ranks: Ranks | None = None,
                 labelled: bool = False) -> TrainState:
    """`set_up` for K heads on one batch stream: `runs` = [(settings, head args)], whose STREAM_KEYS
    agree. `ranks`: the processes (default: torchrun's, or one); a sweep passes `Ranks()` to train
    its share of the heads in each process without DDP. `labelled`: each head's progress lines name
    its run even when it trains alone (a sweep's pass of one head)."""
    # 1. settings, the run paths, processes (one unless launched by torchrun) and samples: refused
    #    before anything is written
    s = runs[0][0]
    for settings, _ in runs:
        settings.check()
        differ = [key for key in STREAM_KEYS if getattr(settings, key) != getattr(s, key)]
        if differ:
            raise ValueError(f"heads set up together must share {', '.join(differ)}")
    if any(settings.tensorboard for settings, _ in runs):
        require_tensorboard()
    ranks = ranks or Ranks.from_env()
    for settings, _ in runs:
        _check_out(settings, ranks)
    device = ranks.start(resolve_device(s.device))
    progress = progress and ranks.main
    train, val = _finished_samples(s)

    built, opened = [], []
    try:
        for settings, head_args in runs:
            # 2. the head, initialised under its seed right before it is built
            torch.manual_seed(settings.seed)
            model = build_for_training(settings, head_args, train.cache.spec)
            # 3. config.json's content, and the run directory: new, or the same experiment to resume.
            #    Rank 0 holds its lock until training ends; a set-up that fails leaves the folder as it was
            config = _config(settings, model, train, val, ranks.world)
            opened.append(_open_run_dir(settings, config, ranks))
            built.append((settings, model, config, opened[-1][0]))
        state = _start(s, built, train, val, ranks, device, progress)
        if ranks.main:
            for settings, _, config, _ in built:
                run_dir.write_json(settings.out / run_dir.CONFIG, config)
    except BaseException:
        for lock, created in opened:
            _abandon(lock, created)
        raise
    config = built[0][2]
    state.coverage = {"cache": config["cache"]["coverage"], "val_cache": config["val_cache_coverage"]}
    state.made = [(created, not settings.resume) for (settings, _), (_, created) in zip(runs, opened)]
    state.labelled = labelled or len(runs) > 1
    if ranks.main:  # once every check passed: an error stays one line
        _warn_incomplete(s, [("cache", train), ("val cache", val)])
    what = (f"{s.head} ({state.head.parameters / 1e6:.2f}M parameters)" if len(runs) == 1 else
            f"{len(runs)} heads ({sum(h.parameters for h in state.heads) / 1e6:.2f}M parameters)")
    epochs = max(settings.epochs for settings, _ in runs)
    label = f"{s.out.name}: " if labelled and len(runs) == 1 else ""  # a sweep's pass of one head
    state.say(f"{label}training {what} on {state.n_samples} samples at T={s.noise_t}, {device}, {epochs} epochs x "
              f"{len(state.batches)} iterations" + (f", {ranks.world} ranks" if ranks.active else ""))
    return state


def _start(s: TrainSettings, built: list, train: Samples, val: Samples | None, ranks: Ranks, device: torch.device,
           progress: bool) -> TrainState:
    """Steps 4 and 5 of `set_up`: the data, the optimizers and the position to start from."""
    # 4. data: every rank loads its own copy of the training set; rank 0 alone validates. One dataset
    #    reads what any head reads; each head takes its tensors from the batch by name
    names = list(dict.fromkeys(name for _, model, _, _ in built for name in model.tensor_names))
    text = any(reads_text(settings, model) for settings, model, _, _ in built)

    def dataset(part: Samples, copies: int = 1) -> FeatureDataset:
        return FeatureDataset(part.path, s.noise_t, names=names, rows=part.rows, text=text,
                              preload=_preload_ok(s.preload, part.cache, names, text, len(part.rows), progress, copies))

    train_set = dataset(train, ranks.local_world)
    val_set = dataset(val) if val is not None and ranks.main else None
    batches = RankBatches(EpochShuffle(len(train_set), s.data_seed), s.batch_size, ranks)
    loader = make_loader(train_set, None, device, batch_sampler=batches, workers=s.workers)

    # 5. the optimizers and their schedules, then the position to start from
    heads = [_head_state(settings, model, ranks, device, len(train_set), lock) for settings, model, _, lock in built]
    state = TrainState(s, heads, ranks, device, batches, loader, len(train_set), val_set, progress)
    for head in heads:
        if head.settings.resume:
            _resume(state, head)
    return state


def first_non_finite(dataset: FeatureDataset) -> dict[str, tuple[int, int]]:
    """Tensor name (the store's: `s8`, `text/embedding`) -> (row, sent_id) of the first sample whose
    values are not all finite, for the tensors that have one. Reads every sample of `dataset` once."""
    sent_ids = open_cache(dataset.path).index["sent_id"]
    found: dict[str, tuple[int, int]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        tensors = dict(item["features"])
        if "text_embedding" in item:
            tensors["text/embedding"] = item["text_embedding"]
        for name, tensor in tensors.items():
            if name not in found and not bool(torch.isfinite(tensor).all()):
                found[name] = (item["row"], int(sent_ids[item["row"]]))
    return found


def reads_text(s: TrainSettings, model) -> bool:
    """Whether the head is given the cached sentence (a text-blind head is given zeros instead)."""
    return bool(model.uses_text) and not s.text_blind


def require_tensorboard() -> None:
    """--tensorboard needs the optional `tensorboard` package: a one-line error, before anything is written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (raises without tensorboard)
    except ImportError:
        raise RefsegError("--tensorboard needs TensorBoard, which is not installed: pip install "
                          "refseg[tensorboard]") from None


# ---- the steps ----------------------------------------------------------------------------------
def _check_out(s: TrainSettings, ranks: Ranks) -> None:
    """--out must be a folder this process can write (or create), free, and empty unless resumed."""
    check_writable(s.out, "--out", directory=True, error=RunError)
    if ranks.main:  # (the other ranks of a torchrun job would find rank 0's lock)
        run_dir.RunLock.refuse_if_held(s.out)  # the cause to name, before the folder's contents are judged
    if not s.resume:
        run_dir.refuse_non_empty(s.out)


def _finished_samples(s: TrainSettings) -> tuple[Samples, Samples | None]:
    """The training samples (and val's), refused in one line when there are none, when the noise
    level is unfinished (unless --allow-incomplete), or when val holds training samples."""
    train_cache, train_path = as_cache(s.cache)
    train = _finished(train_cache, train_path, s, "cache", s.max_samples)
    if s.val_cache is None:
        return train, None
    val_cache, val_path = as_cache(s.val_cache)
    check_compatible(train_cache.extraction_record, val_cache.extraction_record, f"training cache {train_path}",
                     str(val_path), reference="the training cache")
    val = _finished(val_cache, val_path, s, "val cache", None)
    refuse_shared_samples((train.cache, train.path, train.rows), (val.cache, val.path, val.rows))
    return train, val


def _finished(cache, path: Path, s: TrainSettings, what: str, limit: int | None) -> Samples:
    done = np.asarray(cache.done(s.noise_t))  # a missing noise level: the cache's CacheError
    coverage = Coverage.from_flags(s.noise_t, done, cache.skipped(s.noise_t))
    refuse_incomplete(coverage, path, s.allow_incomplete, what)
    rows = np.flatnonzero(done)
    if limit is not None:
        rows = rows[: int(limit)]
    if len(rows) == 0:
        raise CacheError(f"{what} {path} has no finished samples at noise T={s.noise_t}")
    return Samples(cache, path, rows, coverage)


def _warn_incomplete(s: TrainSettings, parts: list[tuple[str, Samples | None]]) -> None:
    for what, part in parts:
        if part is not None and not part.coverage.complete:
            warn(f"{what} {part.path} is incomplete at T={s.noise_t}: using {part.coverage.describe()} "
                 "(--allow-incomplete; recorded in config.json)")


def build_for_training(s: TrainSettings, head_args: dict, spec):
    """The head, text-blind with --text-blind: no attention maps (they are the sentence's), and
    zeros for the sentence (refseg.heads.batches.remove_sentence)."""
    try:
        model = build_head(s.head, spec, **_head_args(s, head_args, spec))
    except (ValueError, KeyError, TypeError) as exc:  # the head refuses its arguments or the cache's tensors
        raise RefsegError(f"cannot build head {s.head!r}: {exc}") from None
    if s.text_blind:
        maps = [name for name in model.tensor_names if spec[name].kind == "attention"]
        if maps:
            raise RefsegError(f"--text-blind reads no cross-attention maps (they depend on the sentence), but head "
                              f"{s.head!r} would read {', '.join(maps)}: leave them out of tensors")
        remove_sentence(model, spec)
    return model


def _head_args(s: TrainSettings, head_args: dict, spec) -> dict:
    """The head's own arguments, with --hidden for the heads that take it, and a text-blind head's
    default tensors: the feature maps without the attention maps."""
    args = dict(head_args)
    parameters = inspect.signature(HEADS[s.head]).parameters
    if "hidden" in parameters:
        args["hidden"] = s.hidden
    if s.text_blind and "tensors" in parameters and args.get("tensors") is None:
        args["tensors"] = [t.name for t in spec.tensors if t.kind != "attention"]
    return args


def _config(s: TrainSettings, model, train: Samples, val: Samples | None, world: int) -> dict:
    """config.json: what was trained on what (its keys and their order are part of a run directory)."""
    lr, weight_decay, poly = s.optimization()
    return {
        "head": s.head, "head_args": model.head_args, "text_blind": s.text_blind,
        "spec": train.cache.spec.select(model.tensor_names).to_dict(),
        "noise_t": s.noise_t, "timestep": train.cache.timestep(s.noise_t),  # int for UNets, float for SD3/FLUX
        "cache": {"path": str(train.path), "fingerprint": train.cache.fingerprint,
                  "settings": train.cache.extraction_record, "samples": int(len(train.rows)),
                  "sample_selection": train.cache.sample_selection, "coverage": train.coverage.to_dict()},
        "val_cache": str(val.path) if val is not None else None,
        "val_cache_coverage": val.coverage.to_dict() if val is not None else None,
        "seed": s.seed, "data_seed": s.data_seed, "optimizer": s.optimizer, "lr": lr, "weight_decay": weight_decay,
        "lr_schedule": f"poly {POLY_POWER} per iteration" if poly else "constant",
        "loss": s.loss, "class_weights": list(CLASS_WEIGHTS), "epochs": s.epochs, "batch_size": s.batch_size,
        "max_samples": s.max_samples, "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "refseg": refseg.core.__version__}, "world_size": world,
    }


def _open_run_dir(s: TrainSettings, config: dict, ranks: Ranks) -> tuple[run_dir.RunLock | None, list[Path]]:
    """-> (rank 0's lock on `out`, the folders made for it). Under the lock, `out` is checked again:
    another trainer may have filled it since `_check_out`."""
    lock, created = None, []
    if ranks.main:
        created = make_dirs(s.out)
        lock = run_dir.RunLock(s.out)  # refused here, it leaves `out` as it is: the other trainer's
    try:
        if s.resume and (s.out / run_dir.CONFIG).exists():
            _check_resumable(s.out, config)
        elif s.resume and run_dir.has_entries(s.out):
            raise RunError(f"{s.out} is not empty and is not a head run directory (no {run_dir.CONFIG}): "
                           "nothing to resume")
        elif not s.resume and ranks.main:
            run_dir.refuse_non_empty(s.out)
        ranks.barrier()  # the other ranks look at `out` only once rank 0 has made it
        s.out.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _abandon(lock, created)
        raise
    return lock, created


def abandon_untrained(state: TrainState) -> None:
    """After a training that failed: the new runs with no completed epoch on disk (it failed, diverged
    or met a full disk before the first epoch's state was saved) get back to what was there before
    them: the run's files removed (config.json, and weights or a log line of the unfinished epoch), the
    folders made for them removed if empty, so no folder is left that looks like a run. A resumed run,
    or one with an epoch on disk, is kept."""
    if not state.ranks.main:
        return
    for head, (created, new) in zip(state.heads, state.made):
        if new and run_dir.completed_epoch(head.out) == 0:
            head.release()  # (its lock is on the folder: let go before the folder goes)
            run_dir.remove_run_files(head.out)
            remove_empty(created)


def _abandon(lock: run_dir.RunLock | None, created: list[Path]) -> None:
    """A set-up that failed: drop the lock and the folders it made, if still empty."""
    if lock is not None:
        lock.release()
    remove_empty(created)


def _check_resumable(out: Path, config: dict) -> None:
    """A resumed run must be the same experiment; only the number of epochs may grow."""
    old = run_dir.read_config(out)
    if old["head"] != config["head"]:
        raise RunError(f"run {out} trains head {old['head']!r}, not {config['head']!r}: choose another --out")
    if old["cache"]["fingerprint"] != config["cache"]["fingerprint"]:
        raise RunError(f"run {out} was trained on a different cache (fingerprint {old['cache']['fingerprint']}, "
                       f"this one {config['cache']['fingerprint']})")
    if old["cache"].get("samples") != config["cache"]["samples"]:
        raise RunError(f"run {out} was trained on {old['cache'].get('samples')} samples of its cache, not "
                       f"{config['cache']['samples']}: resume with the same samples (did the cache's done samples "
                       "change?), or choose another --out")
    for key in RESUME_KEYS:
        before = old.get(key, ABSENT_KEYS[key](old) if key in ABSENT_KEYS else None)
        if before != config.get(key):
            raise RunError(f"run {out} was trained with {key}={before!r}, not {config.get(key)!r}: resume with "
                           "the same settings, or choose another --out")


def _head_state(s: TrainSettings, model, ranks: Ranks, device: torch.device, n_samples: int,
                lock: run_dir.RunLock | None) -> HeadState:
    lr, weight_decay, poly = s.optimization()
    total_iterations = s.epochs * math.ceil(n_samples / s.batch_size)
    model.to(device)
    trained = ranks.wrap(model, device)  # DDP under torchrun: its forward/backward all-reduce the gradients
    optimizer_class = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(iteration: int) -> float:
        return lr * (1 - iteration / total_iterations) ** POLY_POWER if poly else lr

    return HeadState(s, model, trained, optimizer, lr_at, s.out, sum(p.numel() for p in model.parameters()),
                     run_lock=lock)


def _resume(state: TrainState, head: HeadState) -> None:
    """Continue from the last completed epoch: weights, optimizer, random state, position, log."""
    s, out = head.settings, head.out
    if not (out / run_dir.STATE).exists():
        if state.ranks.main:
            run_dir.truncate_metrics(out, 0)  # a first epoch that never finished may have logged a line
        state.say(f"nothing to resume in {out}: starting from epoch 1")
        return
    info, model_sd, opt_sd, rng = run_dir.load_state(out)
    try:
        head.model.load_state_dict(model_sd)
        head.optimizer.load_state_dict(opt_sd)
    except (RuntimeError, ValueError, KeyError) as exc:  # a state file of another head or other settings
        raise RunError(f"{out / run_dir.STATE} does not fit head {s.head!r} {head.model.head_args}: "
                       f"{run_dir.first_mismatch(exc)}") from None
    torch.set_rng_state(rng["rng.torch"])
    if state.device.type == "cuda" and "rng.cuda.0" in rng:
        torch.cuda.set_rng_state_all([rng[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                      if f"rng.cuda.{i}" in rng])
    head.epoch, head.iteration, head.best_oiou = info["epoch"], info["iteration"], info["best_val_oIoU"]
    if state.ranks.main:
        run_dir.truncate_metrics(out, head.epoch)
    if s.optimization()[2] and info.get("epochs") != s.epochs:
        state.say(f"note: the poly lr schedule was planned for {info.get('epochs')} epochs and now spans "
                  f"{s.epochs}: the result differs from a run trained for {s.epochs} epochs from the start")
    state.say(f"resuming {out} after epoch {head.epoch}/{s.epochs}")


def _preload_ok(preload, cache, names: list[str], text: bool, n: int, progress: bool, copies: int = 1) -> bool:
    """Whether to load the samples into RAM first; says how much it needs.

    preload=True: always (FeatureDataset refuses, with one line, what does not fit). preload=None or
    "auto" (the default): when it needs less than half the available memory, counting `copies` (the
    ranks on this machine each load their own). Reading from RAM is as fast as direct shard reads of
    a local uncompressed cache and faster than zarr's API (BENCHMARKS.md, "Cached vs in-loop"), spares the disk, and
    gives the same bytes.
    """
    auto = preload is None or preload == "auto"
    if not (preload or auto):
        return False
    # what FeatureDataset itself will allocate: the store's float type (4 bytes with --cache-dtype fp32)
    need = FeatureDataset.row_bytes(cache.spec, names, text, cache.float_dtype.itemsize) * n
    avail = available_memory()
    if auto and (avail is None or need * copies > avail / 2):
        return False
    progress_line(f"preload: {need / 1e9:.2f} GB for {n} samples of {cache.path}"
                  + (f" ({avail / 1e9:.1f} GB available)" if avail else ""), progress)
    return True


def progress_line(message: str, enabled: bool) -> None:
    """A line of training's progress, on stdout, unlike `refseg.core.cli.say`'s stderr: a training that
    fails after it started leaves stderr to its one `error:` line (DESIGN.md §9), while the lines before
    it (set-up, preload, resume, each epoch's loss and val metrics) stay the run's record on stdout."""
    if enabled:
        print(message, flush=True)
