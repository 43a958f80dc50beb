"""A full disk or an I/O error while `refseg-extract` writes the store (issue 7, point 3).

The fault is injected into the write of one file of the store, in a real process (the engine's
`start_write` for data, zarr's local-store `_put` for metadata and flags): the command must stop with one line and exit 2, what was finished before must read back
as done and final, and the same command run again once the fault is gone must complete the store
exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cache_util import store_files
from _fault_util import Fault, extract_args, extraction_reference, partial_files, run  # noqa: F401

from refseg.cache import open_cache
from refseg.core.errors import CacheError


ENGINE_WRITE, ZARR_PUT = "refseg.cache.engine:start_write", "zarr.storage._local:_put"


@pytest.mark.parametrize("target, action, match, on_call, message, done", [
    # the disk fills up while the second shard of T=5 is written (T=0 is finished by then)
    (ENGINE_WRITE, "enospc", "t0005/s8/c/1/", 1, "No space left on device (ENOSPC)",
     {0: [True] * 10, 5: [True] * 2 + [False] * 8}),
    # an I/O error on the done flag of T=0's third shard: its data is written, never flagged; T=5 never starts
    (ZARR_PUT, "eio", "t0000/done/c/2", 1, "Input/output error (EIO)", {0: [True] * 4 + [False] * 6}),
    # the disk is full from the start: the store's creation fails part-way
    (ZARR_PUT, "enospc", "zarr.json", 3, "No space left on device (ENOSPC)", None),
], ids=["disk-full-mid-run", "io-error-on-a-done-flag", "disk-full-while-creating"])
def test_write_error_stops_cleanly_and_a_rerun_completes_the_store(synth_root, extraction_reference, tmp_path,
                                                                   target, action, match, on_call, message, done):
    store = tmp_path / "C.zarr"
    args = extract_args(synth_root, store)
    failed = run("refseg-extract", args, logs=tmp_path / "logs",
                 faults=[Fault(target, action, on_call=on_call, match=match)])
    assert failed.exitcode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert lines[0].startswith(f"error: writing cache {store} failed: {message} at {store}/")
    assert lines[0].endswith("the shards finished before are kept and valid: free space or fix the disk, "
                             "then rerun the same command to resume")
    assert partial_files(store) == []

    if done is None:
        with pytest.raises(CacheError, match="was not finished"):
            open_cache(store)
    else:
        cache, final = open_cache(store), open_cache(extraction_reference)
        assert cache.images_done().all() and cache.text_done().all()
        assert {t: cache.done(t).tolist() for t in cache.noise_levels} == done
        for t in cache.noise_levels:  # whatever reads as done is the final data
            for row in np.flatnonzero(cache.done(t)):
                got, expected = cache.read(t, row), final.read(t, row)
                assert all(np.array_equal(got[k], expected[k]) for k in expected)

    again = run("refseg-extract", args, logs=tmp_path / "logs")
    assert again.exitcode == 0, again.stderr
    assert partial_files(store) == [] and store_files(store) == store_files(extraction_reference)
