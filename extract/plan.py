"""What an extraction will do, before it does it: `refseg-extract --dry-run` prints it and writes
nothing; a real run checks the disk against it and refuses, in one line, a store that cannot fit
(`--no-space-check` for file systems that misreport their free space).

Where the model's configs say its shapes (a diffusers folder, a cached hub id, a single file with
`--model-config`: backbones/config_only.py), the plan and the check come before its weights are loaded
(`plan_before_loading`, called by the command); otherwise right after loading it (`run_extraction`).

The sizes come from the layout (cache/usage.py `planned_bytes`), not from a guess: the arrays' values
at their storage type plus what each chunk carries; what a store already holds is subtracted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from refseg.backbones.config_only import backbone_shapes
from refseg.cache.layout import CACHE_DTYPES, DEFAULT_SHARD_SIZE, is_local, store_nbytes
from refseg.cache.reader import human_bytes, open_cache
from refseg.cache.usage import planned_bytes
from refseg.core.errors import CacheError, CacheWriteError, RefsegError
from refseg.core.paths import check_output_path, nearest_existing
from refseg.extract.config import ExtractionConfig
from refseg.extract.inputs import SelectedTables, selected_samples
from refseg.extract.resolve import ResolvedExtraction, resolve_extraction


@dataclass
class ExtractionPlan:
    out: str
    samples: int
    images: int
    levels: tuple  # the noise levels asked for
    done_levels: dict  # level -> "complete" / "16 of 142 samples" for those the store holds already
    per_level_bytes: int  # one noise level of this store
    per_sample_bytes: int  # features and maps of one sample at one level (FeatureSpec at the storage type)
    total_bytes: int  # the finished store
    existing_bytes: int  # what the store at `out` holds now
    free_bytes: int | None  # at `out`'s nearest existing folder; None for a remote store
    to_write: int  # what is still to write: the levels' missing shares, and stage 1 unless it is done

    def lines(self) -> list[str]:
        done = ", ".join(f"T={t}: {what}" for t, what in sorted(self.done_levels.items())) or "none"
        free = human_bytes(self.free_bytes) if self.free_bytes is not None else \
            "not checked (an object store has no free space to ask for)" if not is_local(self.out) else \
            "not known (the file system reports no size): not checked"
        return [f"plan for {self.out}: {self.samples} samples (sentences), {self.images} images, noise levels "
                f"{list(self.levels)} (already in the store: {done})",
                f"  {human_bytes(self.per_sample_bytes)} per sample per noise level, {human_bytes(self.per_level_bytes)} per noise "
                f"level; the finished store {human_bytes(self.total_bytes)}",
                f"  to write: {human_bytes(self.to_write)} (the store holds {human_bytes(self.existing_bytes)} now); free at "
                f"{self.out}: {free}",
                "  nothing was written (--dry-run)"]


@dataclass
class DryRun:
    """What `run_extraction` returns for `--dry-run`: the plan, and nothing written."""

    plan: ExtractionPlan
    dataset_changed = False

    def lines(self) -> list[str]:
        return self.plan.lines()


def plan_before_loading(cfg: ExtractionConfig) -> ExtractionPlan | None:
    """The plan of `cfg` from the model's configs alone, before its weights are loaded (seconds to
    minutes for a real model) and before anything is written; None when only the loaded model can say
    (a built-in tiny model, a model not on this machine, a folder whose configs cannot be read):
    `run_extraction` then plans right after loading it. Settings that the model refuses are left to the
    run after loading too, which says them in its own words."""
    cfg.check()
    check_output_path(cfg.out, "cache")
    backbone = backbone_shapes(cfg.model, cfg.model_config)
    if backbone is None:
        return None
    # the data first, as the run reads it: a bad --data-root or --split is said before any model setting
    _, tables = selected_samples(cfg)
    try:
        resolved = resolve_extraction(cfg, backbone)
    except RefsegError:
        return None
    return plan_extraction(resolved, tables)


def plan_extraction(resolved: ResolvedExtraction, tables: SelectedTables) -> ExtractionPlan:
    """The plan of the `resolved` extraction of the selected `tables`."""
    cfg, spec = resolved.cfg, resolved.spec
    n, m = len(tables.samples), len(tables.images)
    asked = list(resolved.level_keys)
    sizes = planned_bytes(spec, n, m, asked, cache_dtype=CACHE_DTYPES[cfg.cache_dtype],
                          shard_size=cfg.shard_size or DEFAULT_SHARD_SIZE, per_image_levels=cfg.prompt == "empty",
                          text_layout=resolved.text_layout,
                          text_bytes=sum(len(t.encode()) for t in tables.samples.text))
    done, missing, stage_one_done, existing = _existing(cfg.out, asked)
    to_write = (0 if stage_one_done else sizes["store"]) + sum(
        round(sizes["per_level"] * missing.get(t, 1.0)) for t in asked)
    free = _free_bytes(cfg.out)
    feature_bytes = spec.bytes_per_sample(1 if cfg.cache_dtype == "int8" else 4 if cfg.cache_dtype == "fp32" else 2)
    return ExtractionPlan(cfg.out, n, m, tuple(asked), done, sizes["per_level"], feature_bytes, sizes["total"],
                          existing, free, to_write)


def _free_bytes(out: str) -> int | None:
    """Free bytes where `out` will be; None when unknown: a remote store, or a file system that reports
    no size at all (/proc, some FUSE mounts), where a write will say what is wrong by itself."""
    if not is_local(out):
        return None
    usage = shutil.disk_usage(nearest_existing(out))
    return None if usage.total == 0 else usage.free


def _existing(out: str, levels: list[int]) -> tuple[dict, dict, bool, int]:
    """Of a store already at `out`: (level -> coverage text, level -> share still missing, whether stage 1
    is done, bytes on disk); ({}, {}, False, 0) when there is none."""
    if is_local(out) and not os.path.exists(out):
        return {}, {}, False, 0
    try:
        cache = open_cache(out)
    except CacheError:
        return {}, {}, False, 0  # nothing there yet, or something the run itself will refuse in its own words
    done, missing = {}, {}
    for t in cache.noise_levels:
        if t in levels:
            coverage = cache.coverage(t)
            done[t] = "complete" if coverage.complete else coverage.describe()
            missing[t] = 1.0 - coverage.fraction
    stage_one_done = bool(cache.images_done().all() and cache.text_done().all())
    return done, missing, stage_one_done, store_nbytes(out)


def check_space(plan: ExtractionPlan) -> None:
    """A one-line error when the store cannot fit on its disk (before anything is computed or written)."""
    if plan.free_bytes is None or plan.to_write <= plan.free_bytes:
        return
    err = CacheWriteError(f"cache {plan.out} needs {human_bytes(plan.to_write)} more on disk "
                          f"({human_bytes(plan.per_level_bytes)} per noise level, {len(plan.levels)} levels) but "
                          f"{human_bytes(plan.free_bytes)} are free there: free space, choose another --out, or reduce "
                          "it (--limit, --sentences first, --strides, --cache-dtype int8); --no-space-check if "
                          "the file system misreports its free space")
    err.errno = 28
    raise err
