"""The caches a head reads: opened from a path (or given opened), checked to hold features of the
same backbone and extraction settings as the run or training cache they are used with, to be
complete at the noise level used, and not to mix training samples into validation or evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refseg.cache import open_cache
from refseg.cache.fingerprint import with_current_kind, with_former_kind
from refseg.core.errors import CacheError, CacheMismatchError


def as_cache(cache):
    """An opened cache from a path or URL (or an already opened one); -> (cache, its location)."""
    if isinstance(cache, (str, Path)):
        return open_cache(cache), location(cache)
    return cache, location(cache.path)


def location(path):
    """A store's location: a Path for a local store, the URL itself for an object store (a Path would
    fold "s3://bucket" into "s3:/bucket")."""
    return str(path) if "://" in str(path) else Path(path)


# Settings that say how features are stored, not what they are (cache/layout.py CACHE_DTYPES)
STORAGE_KEYS = {"extraction": {"cache_dtype"}}


def check_compatible(run_settings: dict, cache_settings: dict, run_name: str, cache_name: str,
                     reference: str = "the run") -> None:
    """Refuse a cache whose backbone or extraction settings differ from the run's (one line).

    The dataset part may differ (a run trained on the train split is evaluated on val), and so may the
    storage type (`cache_dtype`): the same features, kept with more or fewer digits.
    """
    for part in ("backbone", "extraction"):
        run_part, cache_part = (dict(s.get(part) or {}) for s in (run_settings, cache_settings))
        # a backbone kind recorded under its former name matches the same kind under today's name
        a, b = with_former_kind(run_part), with_former_kind(cache_part)
        if part == "backbone":  # said with today's names: kind tiny-synth (also where recorded as 'folder')
            run_part, cache_part = with_current_kind(run_part), with_current_kind(cache_part)
        for key in sorted((set(a) | set(b)) - STORAGE_KEYS.get(part, set())):
            if a.get(key) != b.get(key):  # said with today's names: kind tiny-synth, SD1.x's family
                raise CacheMismatchError(
                    f"cache {cache_name} is incompatible with {run_name}: {part}.{key} is "
                    f"{_short(part, key, cache_part.get(key))} in the cache but {_short(part, key, run_part.get(key))} "
                    f"in {reference}")


def _short(part: str, key: str, value) -> str:
    if (part, key) == ("backbone", "family") and value is None:
        return "'sd' (SD1.x, recorded without a family)"
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- how much of a noise level is there ---------------------------------------------------------
def refuse_incomplete(coverage, path, allow_incomplete: bool, what: str = "cache") -> None:
    """A CacheError when some samples of the level are still to be extracted (`coverage`, a
    `refseg.cache.store.Coverage`), unless `allow_incomplete`: then the caller records the coverage
    with its results."""
    if coverage.complete or allow_incomplete:
        return
    t = coverage.noise_t
    raise CacheError(
        f"{what} {path} is incomplete at noise T={t}: {coverage.describe()} done, {coverage.missing} missing; to "
        f"finish it, run the same refseg-extract command again (--out {path} --noise-t {t} with the settings it "
        f"was made with: it resumes where it stopped), or pass --allow-incomplete to use the {coverage.done} done only")


# ---- which samples two caches share ---------------------------------------------------------------
# The dataset settings that select samples (or say where they live) rather than name the dataset:
# caches of one dataset number their sentences alike whatever split, partition or limit they took.
SELECTION_KEYS = ("data_root", "image_root", "split_by", "split", "sentences", "limit")


def same_dataset(a_settings: dict, b_settings: dict) -> bool:
    """Whether two caches hold samples of one dataset, so that equal sent_ids are the same sentence."""
    def identity(settings):
        return {k: v for k, v in (settings.get("dataset") or {}).items() if k not in SELECTION_KEYS}

    return identity(a_settings) == identity(b_settings)


def shared_sent_ids(a_cache, a_rows, b_cache, b_rows) -> np.ndarray:
    """The sent_ids of rows `a_rows` of one cache that are also rows `b_rows` of the other (same dataset)."""
    if not same_dataset(a_cache.extraction_record, b_cache.extraction_record):
        return np.empty(0, np.int64)
    return np.intersect1d(a_cache.index["sent_id"][a_rows], b_cache.index["sent_id"][b_rows])


def refuse_shared_samples(train, val) -> None:
    """Refuse a val cache holding training samples: best.safetensors would be chosen on training data.

    `train`, `val`: (cache, path, rows used). A copy of the training store, the same store under
    another path, or the same split with another --limit are all caught by their sent_ids.
    """
    (t_cache, t_path, t_rows), (v_cache, v_path, v_rows) = train, val
    same_selection = t_cache.sample_selection == v_cache.sample_selection and same_dataset(t_cache.extraction_record,
                                                                                              v_cache.extraction_record)
    shared = shared_sent_ids(t_cache, t_rows, v_cache, v_rows)
    if same_selection or len(shared):
        what = "the same samples as" if same_selection else f"{len(shared)} of its {len(v_rows)} samples from"
        raise CacheError(f"val cache {v_path} holds {what} the training cache {t_path}: validating on them would "
                         "select best.safetensors on training data; pass a cache of another split as --val-cache")


def training_overlap(run_config: dict, cache) -> str | None:
    """Why `cache` holds samples the run was trained on (a phrase), or None when nothing says so.

    The run's config.json records its training cache's fingerprint, settings and sample selection
    (a config.json may lack the selection), not every sent_id: the same fingerprint, the same
    selection, or the same split of the same dataset are what can be told.
    """
    trained = run_config.get("cache") or {}
    if cache.fingerprint == trained.get("fingerprint"):
        return "is the run's training cache (the same fingerprint)"
    settings = trained.get("settings") or {}
    if not same_dataset(settings, cache.extraction_record):
        return None
    if trained.get("sample_selection") and trained["sample_selection"] == cache.sample_selection:
        return "holds the run's training samples (the same sample selection)"
    mine, theirs = cache.extraction_record.get("dataset") or {}, settings.get("dataset") or {}
    if (mine.get("split_by"), mine.get("split")) == (theirs.get("split_by"), theirs.get("split")):
        return f"is of the split the run was trained on ({mine.get('split_by')} {mine.get('split')!r})"
    return None
