"""What a refseg cache store holds and where: names, shapes, chunking, codecs, and the sample tables.

The store is plain Zarr v3 (docs/DESIGN.md §6)::

    CACHE.zarr/   attrs: refseg_cache, fingerprint, backbone, extraction, dataset, spec, samples,
                         shard_size, codec, dataset_sha256  (+ "bad" once a sample was recorded as bad)
      index/   sent_id ref_id ann_id image_id image_row (N,) int64   text (N,) string
      images/  image_id (M,) int64  orig_hw (M,2) int32  latent (M,C,h,w) f16  done (M,) bool
      text/    input_ids (N,L) int32  attention_mask (N,L) uint8  embedding (N,Lc,D) f16  done (N,) bool
               pooled (N,P) f16  (only for families with a pooled text embedding: SDXL, SD3, FLUX)
      masks/   gt (N,S,S) uint8
      tNNNN/   attrs: noise_t, timestep, and (stores made since the noise convention, DESIGN §5) kind,
                      alpha_bar | sigma, snr, model_timestep, given ("t" | "sigma")
               done (N,) bool  skipped (N,) bool  s8 s16 ... (N,C,H,W) f16  attn_s16 ... (N,L,H,W) f16

Per-sample arrays hold one sample per chunk and `shard_size` samples per shard (one file per shard),
so one sample can be read alone and a writer writes whole files. `done`/`skipped` flags are chunked
by the shard size, so each shard's flags are one file too, written after the shard's data.

Format 2 gives every chunk of every array a CRC-32C (the zarr v3 `crc32c` codec, last in the chunk's
codecs) and writes every chunk, fill values included: an absent chunk of an array refseg wrote is
damage, and a changed byte fails its checksum. Format 1 stores (no data checksums; chunks equal to the
fill value not written) are read too, an absent chunk as the fill value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.errors import GroupNotFoundError

from refseg.cache.quantize import scale_name
from refseg.core.errors import CacheError, CacheNotFoundError, IncompleteCacheError, NewerFormatError
from refseg.core.feature_spec import FeatureSpec

FORMAT_VERSION = 3
CHECKSUM_FORMAT = 2  # the first format whose chunks all carry a CRC-32C and are all written
# The first format whose GT masks are zstd-compressed whatever the store's codec: a binary mask shrinks
# ~270x (a 512x512 mask: 256 KiB -> ~1 KiB), which is most of a no-sentence store's base (README's disk table)
COMPRESSED_MASKS_FORMAT = 3
MASKS_CODEC = "zstd"
# SD1.5 at 512 px: 16 x FeatureSpec.bytes_per_sample() ≈ 78 MB of features per shard (shard sizes
# compared in BENCHMARKS.md, "Cache reads")
DEFAULT_SHARD_SIZE = 16
CODECS = ("none", "zstd", "blosc")
# The type of the big float arrays (latents, text embeddings, features, maps): float16 by default
# (half the disk; a store whose record has no `cache_dtype` holds float16); float32 where exactness matters
# (reproducing VPD's masks without float16 rounding, README "Evaluate VPD's released checkpoint").
# Recorded in the extraction settings as `cache_dtype` only when it is not float16, so the
# fingerprints of float16 stores do not move.
CACHE_DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}
DEFAULT_CACHE_DTYPE = "float16"
# `int8` quantizes the features and maps only (cache/quantize.py): the latents and text embeddings the
# UNet stage starts from stay float16, so a noise level added later gets the same inputs
QUANTIZED_DTYPE = "int8"


def storage_dtypes(cache_dtype: str) -> tuple[str, str]:
    """(features' dtype, latents' and embeddings' dtype) of a store whose settings say `cache_dtype`."""
    if cache_dtype == QUANTIZED_DTYPE:
        return QUANTIZED_DTYPE, DEFAULT_CACHE_DTYPE
    return cache_dtype, cache_dtype

FORMAT_ATTR = "refseg_cache"
# Set on the root while a store is being created and replaced by the real attributes at the end,
# so a creation that was interrupted is recognised (and redone) rather than mistaken for a cache.
CREATING_ATTR = "refseg_cache_creating"
SETTINGS_KEYS = ("backbone", "extraction", "dataset")
# A digest of the dataset's files (refs + instances) the store was extracted from: not part of the
# fingerprint (which names the selection, not the files' contents), checked when the store is resumed
# so that a changed dataset is named as such (cache/fingerprint.py, `dataset_sha256`). A store
# without it is not checked.
DATASET_DIGEST_ATTR = "dataset_sha256"
INDEX_FIELDS = ("sent_id", "ref_id", "ann_id", "image_id", "image_row")
# The family's text arrays as created (`base_arrays`' text_shape and pooled_dim), recorded from format 2
# on so that `refseg-cache verify --repair` can rebuild a lost zarr.json of any array from the attributes
TEXT_LAYOUT_ATTR = "text_layout"

_NOISE_GROUP = re.compile(r"^t(\d{4})$")


def noise_group_name(t: int) -> str:
    """The group holding noise level `t`: 5 -> "t0005"."""
    t = int(t)
    if not 0 <= t <= 9999:
        raise ValueError(f"noise level must be in 0..9999, got {t}")
    return f"t{t:04d}"


def parse_noise_group(name: str) -> int | None:
    """The noise level of a group name ("t0005" -> 5), or None for any other name."""
    m = _NOISE_GROUP.match(name)
    return int(m.group(1)) if m else None


# ---- sample tables ------------------------------------------------------------------------------


@dataclass
class SampleTable:
    """One row per sample (sentence), sorted by (image_id, sent_id). `image_row` indexes `ImageTable`."""

    sent_id: np.ndarray
    ref_id: np.ndarray
    ann_id: np.ndarray
    image_id: np.ndarray
    image_row: np.ndarray
    text: list[str]

    def __post_init__(self):
        for name in INDEX_FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        self.text = [str(s) for s in self.text]
        lengths = {name: len(getattr(self, name)) for name in (*INDEX_FIELDS, "text")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"SampleTable columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.sent_id)


@dataclass
class ImageTable:
    """One row per image, sorted by image_id; `orig_hw` is the original (height, width)."""

    image_id: np.ndarray
    orig_hw: np.ndarray

    def __post_init__(self):
        self.image_id = np.asarray(self.image_id, dtype=np.int64).reshape(-1)
        self.orig_hw = np.asarray(self.orig_hw, dtype=np.int32).reshape(-1, 2)
        if len(self.orig_hw) != len(self.image_id):
            raise ValueError(f"ImageTable: {len(self.image_id)} image ids but {len(self.orig_hw)} sizes")

    def __len__(self) -> int:
        return len(self.image_id)


def build_tables(samples, orig_hw) -> tuple[SampleTable, ImageTable]:
    """Sorted tables from `samples` and `orig_hw` (image_id -> (height, width)).

    A sample is a dict or an object with sent_id, ref_id, ann_id, image_id and `text` (or `sentence`).
    Only images that have samples get an image row.
    """

    def field(s, name, *alternatives):
        for key in (name, *alternatives):
            if isinstance(s, dict) and key in s:
                return s[key]
            if not isinstance(s, dict) and hasattr(s, key):
                return getattr(s, key)
        raise KeyError(f"sample has no {name!r}: {s!r}")

    rows = [(int(field(s, "sent_id")), int(field(s, "ref_id")), int(field(s, "ann_id")),
             int(field(s, "image_id")), str(field(s, "text", "sentence"))) for s in samples]
    rows.sort(key=lambda r: (r[3], r[0]))
    image_ids = sorted({r[3] for r in rows})
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    table = SampleTable(
        sent_id=[r[0] for r in rows], ref_id=[r[1] for r in rows], ann_id=[r[2] for r in rows],
        image_id=[r[3] for r in rows], image_row=[row_of[r[3]] for r in rows], text=[r[4] for r in rows],
    )
    images = ImageTable(image_id=image_ids, orig_hw=np.array([tuple(orig_hw[i]) for i in image_ids]).reshape(-1, 2))
    return table, images


def validate_tables(samples: SampleTable, images: ImageTable) -> None:
    """Raise ValueError unless the tables are what the layout promises (sorted, unique, consistent)."""
    if len(samples) == 0:
        raise CacheError("no samples to store: the selection is empty")
    if len(np.unique(samples.sent_id)) != len(samples):
        raise ValueError("SampleTable: sent_id values are not unique")
    order = np.lexsort((samples.sent_id, samples.image_id))
    if not np.array_equal(order, np.arange(len(samples))):
        raise ValueError("SampleTable must be sorted by (image_id, sent_id)")
    if len(images) and np.any(np.diff(images.image_id) <= 0):
        raise ValueError("ImageTable must be sorted by image_id with unique ids")
    if samples.image_row.min() < 0 or samples.image_row.max() >= len(images):
        raise ValueError("SampleTable.image_row points outside the ImageTable")
    if not np.array_equal(images.image_id[samples.image_row], samples.image_id):
        raise ValueError("SampleTable.image_row does not match the ImageTable's image ids")


# ---- arrays -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayLayout:
    """One stored array: where it lives, its shape and type, and whether it is stored per sample."""

    path: str  # "group/name" from base_arrays(); the bare name inside a tNNNN group from noise_arrays()
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]  # Zarr v3 dimension names (xarray needs them)
    per_row: bool  # one row per chunk, `shard_size` rows per shard; else one chunk
    compressible: bool = False  # the big float16 arrays, which take the store's codec
    own_codec: str | None = None  # a codec this array has whatever the store's (the GT masks, format 3)


def base_arrays(spec: FeatureSpec, n_samples: int, n_images: int,
                float_dtype: str = DEFAULT_CACHE_DTYPE, text_shape: tuple[int, int] | None = None,
                pooled_dim: int | None = None, format_version: int = FORMAT_VERSION) -> list[ArrayLayout]:
    """Every array outside the noise groups, in creation order (`float_dtype`: latents and embeddings)
    of a store of `format_version`.

    `text_shape`: (context length Lc, width D) of the stored text embedding, (token length, text_dim)
    unless the family's context is longer (SD3: CLIP + T5 tokens); `pooled_dim`: add text/pooled.
    """
    n, m = n_samples, n_images
    L, D, S = spec.token_length, spec.text_dim, spec.image_size
    Lc, D = text_shape if text_shape is not None else (L, D)
    h = spec.latent_size
    pooled = [] if pooled_dim is None else [
        ArrayLayout("text/pooled", (n, int(pooled_dim)), float_dtype, ("sample", "pooled_dim"), True)]
    index = [ArrayLayout(f"index/{name}", (n,), "int64", ("sample",), False) for name in INDEX_FIELDS]
    return index + [
        ArrayLayout("index/text", (n,), "string", ("sample",), False),
        ArrayLayout("images/image_id", (m,), "int64", ("image",), False),
        ArrayLayout("images/orig_hw", (m, 2), "int32", ("image", "hw"), False),
        ArrayLayout("images/latent", (m, spec.latent_channels, h, h), float_dtype,
                    ("image", "latent_channel", "latent_y", "latent_x"), True, compressible=True),
        ArrayLayout("text/input_ids", (n, L), "int32", ("sample", "token"), True),
        ArrayLayout("text/attention_mask", (n, L), "uint8", ("sample", "token"), True),
        ArrayLayout("text/embedding", (n, Lc, D), float_dtype, ("sample", "context_token", "text_dim")
                    if Lc != L else ("sample", "token", "text_dim"), True, compressible=True),
        *pooled,
        ArrayLayout("masks/gt", (n, S, S), "uint8", ("sample", "y", "x"), True,
                    own_codec=MASKS_CODEC if int(format_version) >= COMPRESSED_MASKS_FORMAT else None),
    ]


# A noise group whose features are stored once per image (`--prompt empty`: every sentence of an image
# has the same condition and ε, so the same features) has this attribute; its arrays and flags then have
# one row per image, and a sample reads its image's row (`index/image_row`). Other groups: one per sample.
ROWS_ATTR, PER_IMAGE = "rows", "image"


def noise_arrays(spec: FeatureSpec, n_rows: int, float_dtype: str = DEFAULT_CACHE_DTYPE,
                 dim: str = "sample") -> list[ArrayLayout]:
    """The arrays of one noise group (paths relative to the group): every spec tensor, in `float_dtype`;
    for int8 each tensor's codes and its per-row, per-channel float32 scales (`<name>_scale`). `n_rows`
    rows of `dim` ("sample", or "image" for a per-image group)."""
    out = []
    for t in spec.tensors:
        channel_dim = "token" if t.kind == "attention" else f"{t.name}_channel"
        out.append(ArrayLayout(t.name, (n_rows, *t.shape), float_dtype,
                               (dim, channel_dim, f"{t.name}_y", f"{t.name}_x"), True, compressible=True))
        if float_dtype == QUANTIZED_DTYPE:
            out.append(ArrayLayout(scale_name(t.name), (n_rows, t.shape[0]), "float32", (dim, channel_dim), True))
    return out


def has_checksums(format_version: int) -> bool:
    """Whether a store of this format has a CRC-32C on every chunk and every chunk written."""
    return int(format_version) >= CHECKSUM_FORMAT


def compressors_for(codec: str, itemsize: int = 2, checksums: bool = True):
    """Zarr bytes-to-bytes codecs for an array under the store's `codec` (`itemsize` bytes per value;
    "none" for the arrays that are never compressed), then the chunk's CRC-32C (format 2)."""
    if codec == "none":
        compressors = ()
    elif codec == "zstd":
        compressors = (ZstdCodec(level=1),)
    elif codec == "blosc":
        # bit-shuffle on the float words groups sign/exponent bits, which is what compresses
        compressors = (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=itemsize),)
    else:
        raise ValueError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")
    # the checksum last: it covers the bytes as stored, so a flipped byte is caught before decompression
    return (*compressors, Crc32cCodec()) if checksums else (compressors or None)


# Every chunk written, fill values included (zarr-python skips chunks equal to the fill value by
# default): an absent chunk then always means damage. tensorstore's `store_data_equal_to_fill_value`
# does the same for the engine's writes (cache/engine.py).
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def array_codec(layout: ArrayLayout, store_codec: str) -> str:
    """The codec `layout` is stored with in a store of codec `store_codec`."""
    return layout.own_codec or (store_codec if layout.compressible else "none")


def create_array(group, layout: ArrayLayout, name: str, shard_size: int, codec: str, checksums: bool = True):
    """Create `layout` as `group[name]` (no data written); `checksums`: format 2's CRC-32C per chunk."""
    shape = layout.shape
    if layout.per_row:
        chunks = (1, *shape[1:])
        shards = (shard_size, *shape[1:])
    else:
        chunks, shards = tuple(max(1, s) for s in shape), None
    itemsize = 1 if layout.dtype == "string" else np.dtype(layout.dtype).itemsize
    return group.create_array(
        name, shape=shape, dtype=str if layout.dtype == "string" else layout.dtype,
        chunks=chunks, shards=shards, fill_value="" if layout.dtype == "string" else 0,
        compressors=compressors_for(array_codec(layout, codec), itemsize, checksums),
        dimension_names=layout.dims, config=WRITE_EVERY_CHUNK,
    )


def create_flags(group, name: str, n: int, shard_size: int, dim: str = "sample", checksums: bool = True):
    """A bool flag array chunked by the shard size: one small file per shard. An absent flag file reads
    as "not done" (the flags are read leniently: the shard is then computed again, never trusted)."""
    return group.create_array(name, shape=(n,), dtype="bool", chunks=(shard_size,), fill_value=False,
                              compressors=compressors_for("none", 1, checksums), dimension_names=(dim,),
                              config=WRITE_EVERY_CHUNK)


# ---- paths --------------------------------------------------------------------------------------


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def store_nbytes(path: str) -> int:
    """Bytes the store takes on disk (local directory or fsspec URL)."""
    if is_local(path):
        total = 0
        for dirpath, _, files in os.walk(local_path(path)):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total
    import fsspec  # deferred: remote stores only (an optional dependency)

    fs, root = fsspec.core.url_to_fs(path)
    return int(fs.du(root, total=True))


def _remote_is_empty(path: str) -> bool:
    import fsspec  # deferred: remote stores only (an optional dependency)

    fs, root = fsspec.core.url_to_fs(path)
    return not fs.exists(root) or not fs.ls(root)


def open_root(path: str, mode: str = "r"):
    """The root group of an existing refseg cache, or a CacheError that says what is at `path` instead."""
    if is_local(path):
        p = local_path(path)
        if not os.path.exists(p):
            raise CacheNotFoundError(f"cache not found: {path}")
        if not os.path.isdir(p):
            raise CacheError(f"{path} is not a refseg cache (it is a file, not a Zarr store directory)")
        if not os.listdir(p):
            raise CacheNotFoundError(f"cache not found: {path} is an empty directory")
    try:
        root = zarr.open_group(path, mode=mode)
    except GroupNotFoundError:  # (a FileNotFoundError subclass: catch it first) something else is there
        if not is_local(path) and _remote_is_empty(path):
            raise CacheNotFoundError(f"cache not found: {path}") from None
        raise CacheError(f"{path} is not a refseg cache (not a Zarr v3 group)") from None
    except FileNotFoundError:
        raise CacheNotFoundError(f"cache not found: {path}") from None
    except (NotADirectoryError, ValueError, KeyError, TypeError):
        raise CacheError(f"{path} is not a refseg cache (not a Zarr v3 group)") from None
    attrs = root.attrs.asdict()
    if FORMAT_ATTR not in attrs:
        if CREATING_ATTR in attrs:
            raise IncompleteCacheError(f"cache {path} was not finished (its creation was interrupted); "
                                       f"run the extraction again to recreate it")
        raise CacheError(f"{path} is not a refseg cache (no '{FORMAT_ATTR}' attribute)")
    version = attrs[FORMAT_ATTR]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NewerFormatError(f"cache {path} was written by a newer refseg (format {version}); upgrade refseg")
    return root
