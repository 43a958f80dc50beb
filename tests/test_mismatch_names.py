"""Incompatibility messages name backbones as they are called today (issue 23): tiny-synth's kind is
'tiny-synth' (the fingerprint hashes its former name, 'folder'), and SD1.x, recorded without a family,
is 'sd', not null."""

from __future__ import annotations

import pytest

from refseg.cache.fingerprint import mismatch_message
from refseg.core.errors import CacheMismatchError
from refseg.heads.caches import check_compatible

TINY_SYNTH = {"model": "tiny-synth", "kind": "tiny-synth", "weights_sha256": "a"}
SD2 = {"model": "tiny-sd2", "kind": "tiny", "family": "sd2", "weights_sha256": "b"}


def test_a_run_and_a_cache_of_other_backbones_are_named_as_today():
    with pytest.raises(CacheMismatchError) as err:
        check_compatible({"backbone": TINY_SYNTH, "extraction": {}}, {"backbone": SD2, "extraction": {}}, "run R", "C")
    message = str(err.value)
    assert "backbone.family is 'sd2' in the cache but 'sd' (SD1.x, recorded without a family) in the run" in message
    assert "folder" not in message and "null" not in message
    with pytest.raises(CacheMismatchError, match="backbone.kind is 'tiny' in the cache but 'tiny-synth' in the run"):
        check_compatible({"backbone": {**TINY_SYNTH, "family": "sd2", "weights_sha256": "b"}, "extraction": {}},
                         {"backbone": {**SD2, "model": "tiny-synth"}, "extraction": {}}, "run R", "C")


def test_a_renamed_kind_still_matches_and_a_store_mismatch_shows_todays_name():
    old = {**TINY_SYNTH, "kind": "folder"}  # a run recorded before the kind was renamed
    check_compatible({"backbone": old, "extraction": {}}, {"backbone": TINY_SYNTH, "extraction": {}}, "run", "C")
    line = mismatch_message("C.zarr", {"backbone": {**TINY_SYNTH, "weights_sha256": "x"}},
                            {"backbone": TINY_SYNTH})
    assert "backbone.weights_sha256 is 'x' in the store but 'a' now" in line and "folder" not in line
    line = mismatch_message("C.zarr", {"backbone": TINY_SYNTH}, {"backbone": SD2})
    assert "backbone.kind is 'tiny-synth' in the store but 'tiny' now" in line
    assert "backbone.family is 'sd' (SD1.x, recorded without a family) in the store but 'sd2' now" in line
