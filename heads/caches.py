"""The caches a head reads: opened from a path (or given opened), and checked to hold features of
the same backbone and extraction settings as the run or training cache they are used with."""

from __future__ import annotations

import json
from pathlib import Path

from refseg.cache import open_cache
from refseg.core.errors import CacheMismatchError


def as_cache(cache):
    """An opened cache from a path (or an already opened one); -> (cache, path)."""
    if isinstance(cache, (str, Path)):
        return open_cache(cache), Path(cache)
    return cache, Path(cache.path)


def check_compatible(run_settings: dict, cache_settings: dict, run_name: str, cache_name: str,
                     reference: str = "the run") -> None:
    """Refuse a cache whose backbone or extraction settings differ from the run's (one line).

    The dataset part may differ (a run trained on the train split is evaluated on val).
    """
    for part in ("backbone", "extraction"):
        a, b = run_settings.get(part) or {}, cache_settings.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise CacheMismatchError(
                    f"cache {cache_name} is incompatible with {run_name}: {part}.{key} is "
                    f"{_short(b.get(key))} in the cache but {_short(a.get(key))} in {reference}")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
