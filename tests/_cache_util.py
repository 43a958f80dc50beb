"""Small caches for the cache tests: a tiny FeatureSpec, sample tables and seeded random contents."""

from __future__ import annotations

import os

import numpy as np

from refseg.cache.layout import build_tables
from refseg.cache.opening import NewStore
from refseg.cache.writer import CacheWriter
from refseg.core.feature_spec import FeatureSpec

TINY_UNET = {
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 8,
    "in_channels": 4,
}


def tiny_spec() -> FeatureSpec:
    # at 32 px a stride-64 feature would be smaller than one pixel: stop at 32
    return FeatureSpec.from_unet_config(TINY_UNET, image_size=32, token_length=6, strides=(8, 16, 32),
                                        attn_strides=(16, 32))


def settings(**extraction) -> dict:
    return {
        "backbone": {"model": "tiny", "revision": "abc123"},
        "extraction": {"image_size": 32, "token_length": 6, "latent_scaling": "sd", "noise_seed": 0, **extraction},
        "dataset": {"name": "refcoco-synth", "split_by": "unc", "split": "train"},
    }


def tables(n_images: int = 5, seed: int = 0):
    """Images with 1-3 sentences each (10-ish samples), ids deliberately not in row order."""
    rng = np.random.default_rng(seed)
    samples, orig_hw, sent_id = [], {}, 1000
    for k in range(n_images):
        image_id = 500 - 37 * k  # descending ids: the table must sort them
        orig_hw[image_id] = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        for j in range(1 + k % 3):
            sent_id -= 7
            samples.append({"sent_id": sent_id, "ref_id": 10 * k + j // 2, "ann_id": 100 + k,
                            "image_id": image_id, "text": f"the shape number {k} ünïcode {j}"})
    return build_tables(samples, orig_hw)


def random_contents(spec: FeatureSpec, n_samples: int, n_images: int, noise_levels=(0, 500), seed: int = 1) -> dict:
    """Everything a cache holds, as arrays: {"latent", "input_ids", ..., ("t", T): {name: array}}."""
    rng = np.random.default_rng(seed)
    L, D, S, h = spec.token_length, spec.text_dim, spec.image_size, spec.latent_size
    out = {
        "latent": rng.standard_normal((n_images, spec.latent_channels, h, h)).astype(np.float16),
        "input_ids": rng.integers(0, 49408, (n_samples, L)).astype(np.int32),
        "attention_mask": (rng.random((n_samples, L)) < 0.7).astype(np.uint8),
        "embedding": rng.standard_normal((n_samples, L, D)).astype(np.float16),
        "gt": (rng.random((n_samples, S, S)) < 0.3).astype(np.uint8),
    }
    for t in noise_levels:
        out[("t", t)] = {x.name: rng.standard_normal((n_samples, *x.shape)).astype(np.float16) for x in spec.tensors}
    return out


def open_writer(path, shard_size: int = 4, codec: str = "none", overwrite: bool = False, n_images: int = 5,
                **extraction) -> CacheWriter:
    samples, images = tables(n_images)
    return CacheWriter.open(path, NewStore(spec=tiny_spec(), extraction_record=settings(**extraction),
                                           samples=samples, images=images, shard_size=shard_size,
                                           codec=codec), overwrite=overwrite)


def fill(writer: CacheWriter, contents: dict, noise_levels=(0, 500), reverse: bool = False) -> None:
    """Write every stage, shard by shard (in reverse shard order if asked)."""
    order = (lambda shards: shards[::-1]) if reverse else (lambda shards: shards)
    for rows in order(writer.image_shards_todo()):
        writer.write_latents(rows, contents["latent"][rows])
    for rows in order(writer.text_shards_todo()):
        writer.write_text(rows, contents["input_ids"][rows], contents["attention_mask"][rows],
                          contents["embedding"][rows], contents["gt"][rows])
    for t in order(list(noise_levels)):
        writer.add_noise_level(t, timestep=max(t, 1))
        for rows in order(writer.feature_shards_todo(t)):
            writer.write_features(t, rows, {name: a[rows] for name, a in contents[("t", t)].items()})


def filled_store(path) -> tuple:
    """A store at `path` written with every array (random contents); -> (path, contents)."""
    writer = open_writer(path)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents)
    return path, contents, writer


def store_files(path) -> dict[str, bytes]:
    """Every file under a store, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def all_arrays(path) -> dict:
    """Every array of a store (local path or URL), read by plain zarr-python (no refseg)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(group, prefix):
        for name, array in group.arrays():
            out[f"{prefix}{name}"] = array[:]
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root, "")
    return out
