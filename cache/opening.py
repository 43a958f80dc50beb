"""What `CacheWriter.open` creates a store from (`NewStore`), and how it decides between creating,
resuming and replacing the store at a path.

A store with the same fingerprint (cache/fingerprint.py: the extraction record, the spec and the
samples) is resumed: its sample tables are restored where damaged, and the temporary files of writers
killed mid-write are removed by a writer alone with the store. One with another fingerprint is
refused, naming the difference, unless `--overwrite` replaces it. The creation itself and the shard
writes are cache/writer.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from refseg.cache.engine import LOCK_DEBRIS_SUFFIX, ZarrEngine
from refseg.cache.fingerprint import dataset_changed, dataset_changed_message, fingerprint_payload, mismatch_message
from refseg.cache.layout import (
    CODECS,
    DATASET_DIGEST_ATTR,
    DEFAULT_SHARD_SIZE,
    FORMAT_ATTR,
    INDEX_FIELDS,
    TEXT_LAYOUT_ATTR,
    WRITE_EVERY_CHUNK,
    ImageTable,
    SampleTable,
    has_checksums,
    local_path,
    open_root,
    validate_tables,
)
from refseg.core.errors import (
    CacheError,
    CacheMismatchError,
    CacheNotFoundError,
    DamagedCacheError,
    IncompleteCacheError,
    NewerFormatError,
)
from refseg.core.feature_spec import FeatureSpec


@dataclass(frozen=True)
class NewStore:
    """A store as `CacheWriter.open` creates it, or resumes it when the store there has its fingerprint.

    `extraction_record`: the backbone's identity, the extraction settings and the dataset selection
    (what `Store.extraction_record` reads back); with `spec` and the samples' sent_ids, what the
    fingerprint covers. `dataset_sha256` (`refseg.cache.fingerprint.dataset_sha256` of the dataset's
    files) is recorded in a new store; a store made from other versions of those files is refused while
    its stage 1 (which reads the dataset) is unfinished. `text_shape` and `pooled_dim`: the family's
    text context (`layout.base_arrays`); None: SD's (token_length, text_dim), no pooled embedding.
    An existing store keeps its own shard size and codec (read `writer.shard_size`).
    """

    spec: FeatureSpec
    extraction_record: dict
    samples: SampleTable
    images: ImageTable
    shard_size: int = DEFAULT_SHARD_SIZE
    codec: str = "none"
    dataset_sha256: str | None = None
    text_shape: tuple[int, int] | None = None
    pooled_dim: int | None = None

    def check(self) -> None:
        """A ValueError for a codec or shard size no store has, or tables the layout does not promise."""
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r} (choose from {', '.join(CODECS)})")
        if int(self.shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        validate_tables(self.samples, self.images)

    def fingerprint_payload(self) -> dict:
        """What the fingerprint is computed from, and what the store's attributes record of it."""
        return fingerprint_payload(self.extraction_record, self.spec, self.samples.sent_id)

    @property
    def text_layout(self) -> dict:
        return {"text_shape": self.text_shape, "pooled_dim": self.pooled_dim}

    def layout_attrs(self) -> dict:
        """The root attributes beside the payload: the dataset's digest (when known) and the text layout."""
        extra = {DATASET_DIGEST_ATTR: self.dataset_sha256} if self.dataset_sha256 else {}
        extra[TEXT_LAYOUT_ATTR] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.text_layout.items()}
        return extra


# zarr's LocalStore writes `<file>.<uuid hex>.partial`, tensorstore `<file>.__lock`, then each renames into place
_PARTIAL_FILE = re.compile(r"(\.[0-9a-f]{32}\.partial|" + re.escape(LOCK_DEBRIS_SUFFIX) + ")$")


def remove_stale_partial_files(path: str) -> int:
    """Delete the temporary files that writes cut short by a crash left in a local store; how many.

    Only safe while no other process writes the store (the caller holds its presence alone).
    """
    removed = 0
    for dirpath, _, files in os.walk(local_path(path)):
        for name in files:
            if _PARTIAL_FILE.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
    return removed


def stage_one_done(root: zarr.Group) -> bool:
    """Whether every latent, sentence and mask is stored: stage 2 then reads the store alone."""
    return bool(root["images/done"][:].all() and root["text/done"][:].all())


def restore_tables(path: str, root: zarr.Group, samples: SampleTable, images: ImageTable) -> None:
    """Rewrite the sample tables of a store being resumed where they no longer read back (a lost or
    corrupt chunk: `refseg-cache verify --repair` leaves them to this). The fingerprint matched, so
    `samples` and `images` are the store's own rows. Format 1 cannot tell a lost chunk from zeros."""
    if not has_checksums(root.attrs[FORMAT_ATTR]):
        return
    engine = ZarrEngine(path, True, root)
    columns = {**{f"index/{name}": getattr(samples, name) for name in INDEX_FIELDS},
               "images/image_id": images.image_id, "images/orig_hw": images.orig_hw}
    for key, values in columns.items():
        try:
            engine.read(key, 0, len(values))
        except DamagedCacheError:
            root[key].with_config(WRITE_EVERY_CHUNK)[:] = values
    text = root["index/text"]
    try:
        intact = text.nchunks_initialized == text.nchunks and len(text[:]) == len(samples)
    except ValueError:  # its checksum
        intact = False
    if not intact:
        text.with_config(WRITE_EVERY_CHUNK)[:] = np.array(samples.text, dtype=object)


@contextlib.contextmanager
def made_by_another_process():
    """Creating a group or array that another writer created meanwhile (on an object store, where there
    are no locks): the same layout from the same settings, so theirs stands and this one goes on."""
    try:
        yield
    except (ContainsArrayError, ContainsGroupError):
        pass


def refuse_what_is_not_a_cache(path: str) -> None:
    try:
        open_root(path, mode="r")
    except (CacheNotFoundError, IncompleteCacheError, NewerFormatError):
        pass  # to be created, redone or replaced: decided under the lock


def open_or_replace(path: str, payload: dict, fingerprint: str, overwrite: bool, alone: bool,
                    dataset_sha256: str | None) -> zarr.Group | None:
    """The root of the store at `path` to resume, or None where a new store is to be created.

    `--overwrite` replaces a store whose settings differ (or that is from a newer format); a store
    with the same fingerprint is resumed even then, so every rank of a job may pass --overwrite,
    unless the dataset changed while its stage 1 is unfinished (old and new data would mix).
    """
    try:
        root = open_root(path, mode="r+")
    except CacheNotFoundError:
        return None
    except IncompleteCacheError:
        return None  # an interrupted creation holds nothing worth keeping: create it again
    except NewerFormatError:
        if not overwrite:
            raise
        root = None
    if root is not None:
        attrs = root.attrs.asdict()
        changed = dataset_changed(attrs, dataset_sha256)
        if attrs["fingerprint"] == fingerprint and (not changed or stage_one_done(root)):
            return root
        cause = dataset_changed_message(path, attrs, dataset_sha256) if changed else None
        if attrs["fingerprint"] == fingerprint and not overwrite:
            raise CacheMismatchError(
                f"{cause}, and the latents, sentences and masks of cache {path} are not all extracted yet: old "
                "and new data would mix; restore the dataset the cache was made from, or pass --overwrite to "
                "extract it again from the new files")
        if not overwrite:
            stored = {key: attrs[key] for key in payload}
            raise CacheMismatchError(mismatch_message(path, stored, payload, first=cause))
    if not alone:
        raise CacheError(f"cache {path} is being written by another process now: --overwrite cannot replace "
                         "it until that process ends")
    return None

