"""Small synthetic caches with a *learnable* signal, for the heads' tests (written via CacheWriter).

Each image holds two rectangles on the stride-8 grid, P and Q, and has two sentences: one refers to
P, the other to Q (as RefCOCO refers to several objects per image). The image's s8 and s16 features
hold a noisy copy of P's mask in channel 0 and of Q's in channel 1; every other channel, s32 and the
attention maps are noise. Only the sentence says which rectangle is meant: its second token's
embedding is +e0 for P and -e0 for Q. A head without text (`vpd`, `linear`) sees the same features
for both sentences, so it can do no better than P, Q or their union (IoU ~ 0.5) and cannot memorise
its way past that; `film` can learn to pick the target. With `refer=`, samples and GT masks come
from a real (synthetic RefCOCO-format) dataset instead, and channel 0 holds the target itself, so any
head can learn it.
"""

from __future__ import annotations

import numpy as np

from refseg.cache.layout import build_tables
from refseg.cache.opening import NewStore
from refseg.cache.writer import CacheWriter
from refseg.core.feature_spec import FeatureSpec

UNET = {
    "block_out_channels": (8, 12, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 8,
    "in_channels": 4,
}
IMAGE_SIZE = 64
TOKENS = 6


def spec(image_size=IMAGE_SIZE, strides=(8, 16, 32), attn_strides=(16, 32), unet=None) -> FeatureSpec:
    return FeatureSpec.from_unet_config(unet or UNET, image_size=image_size, token_length=TOKENS, strides=strides,
                                        attn_strides=attn_strides)


def settings(split="train", model="synthetic-test", data_root=None, **extraction) -> dict:
    return {
        "backbone": {"model": model, "revision": "test"},
        "extraction": {"image_size": IMAGE_SIZE, "token_length": TOKENS, "latent_scaling": "sd", "noise_seed": 0,
                       **extraction},
        "dataset": {"data_root": str(data_root) if data_root else None, "dataset": "refcoco-synth",
                    "split_by": "unc", "split": split},
    }


def _rect(rng, grid: int, avoid=None):
    for _ in range(100):
        h, w = rng.integers(2, grid // 2 + 1, size=2)
        y, x = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        m = np.zeros((grid, grid), bool)
        m[y:y + h, x:x + w] = True
        if avoid is None or not (m & avoid).any():
            return m
    raise RuntimeError("could not place two disjoint rectangles")


def _pool(mask: np.ndarray, factor: int) -> np.ndarray:
    g = mask.shape[0] // factor
    return mask.reshape(g, factor, g, factor).mean(axis=(1, 3))


# Sentence ids per split, as a real dataset numbers them: no sentence is in two splits (training
# refuses a val cache that shares samples with the training cache).
FIRST_SENT_ID = {"train": 1000, "val": 200_000, "test": 400_000}


def make_cache(path, n: int = 48, *, split="train", seed=0, noise_levels=(5,), the_spec=None, shard_size=8,
               noise=0.5, refer=None, settings_override=None, feature_shards=None, skipped_rows=()) -> dict:
    """Write a learnable cache at `path`; returns {"spec", "target" (N,) 0=P 1=Q, "gt" (N,S,S)}.

    `feature_shards`: write only the first k shards of each noise level (an interrupted extraction);
    `skipped_rows`: rows recorded as bad (`--skip-bad`: stored as zeros, flagged skipped).
    """
    the_spec = the_spec or spec()
    rng = np.random.default_rng(seed)
    S, L, D = the_spec.image_size, the_spec.token_length, the_spec.text_dim
    grid = S // 8

    if refer is not None:
        from refseg.core.transforms import mask_to_size

        chosen = refer.samples(split)[:n]
        samples = [{"sent_id": s.sent_id, "ref_id": s.ref_id, "ann_id": s.ann_id, "image_id": s.image_id,
                    "text": s.sentence} for s in chosen]
        hw = {s.image_id: (refer.image(s.image_id)["height"], refer.image(s.image_id)["width"]) for s in chosen}
    else:
        n += n % 2  # two sentences per image
        first = FIRST_SENT_ID.get(split, 600_000)
        samples = [{"sent_id": first + i, "ref_id": 500 + i, "ann_id": 700 + i, "image_id": 100 + i // 2,
                    "text": f"the {'first' if i % 2 == 0 else 'second'} rectangle of image {i // 2}"}
                   for i in range(n)]
        hw = {100 + k: (S + 8 * k, S) for k in range(n // 2)}
    table, images = build_tables(samples, hw)
    n = len(table)

    gt = np.zeros((n, S, S), np.uint8)
    cells = np.zeros((n, 2, grid, grid), np.float32)  # P, Q on the stride-8 grid
    target = rng.integers(0, 2, size=n)
    for i in range(n):
        if refer is not None:
            full = mask_to_size(refer.mask(int(table.ref_id[i])), S).astype(bool)
            gt[i] = full
            cells[i, 0] = _pool(full, 8)
            cells[i, 1] = _rect(rng, grid)
            target[i] = 0
        else:
            if i % 2 == 0:
                p = _rect(rng, grid)
                q = _rect(rng, grid, avoid=p)
            cells[i] = p, q
            target[i] = i % 2
            gt[i] = np.kron(cells[i, target[i]], np.ones((8, 8))).astype(np.uint8)

    embedding = rng.standard_normal((n, L, D)).astype(np.float32)
    embedding[:, 0] = 1.0  # a "BOS" token, the same for every sentence
    embedding[:, 1, 0] = np.where(target == 0, 3.0, -3.0)
    attention_mask = np.zeros((n, L), np.uint8)
    attention_mask[:, :4] = 1

    features = {}
    image_row = table.image_row
    for t in the_spec.tensors:
        a = noise * rng.standard_normal((n, *t.shape)).astype(np.float32)
        if t.kind == "feature" and refer is None:
            a = a[image_row * 2]  # features are the image's: both sentences of an image see the same
        if t.kind == "feature" and t.stride in (8, 16):
            f = t.stride // 8
            for c in (0, 1):
                pooled = np.stack([_pool(m, f) for m in cells[:, c]]) if f > 1 else cells[:, c]
                a[:, c] += 2.0 * pooled
        elif t.kind == "attention":
            a = np.abs(a) / t.channels
        features[t.name] = a

    writer = CacheWriter.open(path, NewStore(spec=the_spec, extraction_record=settings_override or settings(split),
                                             samples=table, images=images, shard_size=shard_size))
    for rows in writer.image_shards_todo():
        k = rows.stop - rows.start
        writer.write_latents(rows, np.zeros((k, the_spec.latent_channels, S // 8, S // 8), np.float16))
    for rows in writer.text_shards_todo():
        writer.write_text(rows, np.zeros((rows.stop - rows.start, L), np.int32), attention_mask[rows],
                          embedding[rows], gt[rows])
    skipped = np.zeros(n, bool)
    skipped[list(skipped_rows)] = True
    for t in noise_levels:
        writer.add_noise_level(t, timestep=max(t, 1))
        for rows in writer.feature_shards_todo(t)[:feature_shards]:
            writer.write_features(t, rows, {name: a[rows] for name, a in features.items()}, skipped=skipped[rows])
    return {"spec": the_spec, "target": target, "gt": gt}


def train_val_caches(root, n_train: int, n_val: int) -> tuple:
    """A train cache (seed 0) and a val cache (seed 1) of the same settings under `root`: (train, val)."""
    make_cache(root / "train.zarr", n_train, split="train", seed=0)
    make_cache(root / "val.zarr", n_val, split="val", seed=1)
    return root / "train.zarr", root / "val.zarr"
