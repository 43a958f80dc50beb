"""The stages of extraction as small types: what the store calls each, and how a whole shard is stored.

A stage names its rows' claims and done flags in the store (`key`: "images", "text" or the noise
level T, as cache/writer.py spells them), writes a finished shard (`write`), and says what it is
only when printed (`str(stage)` in the report, `title` on its progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refseg.cache.writer import CacheWriter


@dataclass(frozen=True)
class Latents:
    """Stage 1a: the VAE latent of each image (arrays: "latent")."""

    key = "images"
    unit = "img"
    title = "VAE (images)"

    def __str__(self) -> str:
        return "vae (images)"

    def write(self, writer: CacheWriter, shard: slice, arrays: dict, skipped: np.ndarray) -> None:
        writer.write_latents(shard, arrays["latent"])  # an unreadable image's is zeros: see record_bad


@dataclass(frozen=True)
class Text:
    """Stage 1b: tokens, text embedding and ground-truth mask of each sentence."""

    key = "text"
    unit = "sent"
    title = "text + masks"

    def __str__(self) -> str:
        return "text encoder (sentences)"

    def write(self, writer: CacheWriter, shard: slice, arrays: dict, skipped: np.ndarray) -> None:
        writer.write_text(shard, **arrays)  # input_ids, attention_mask, embedding, gt


@dataclass(frozen=True)
class NoiseLevel:
    """Stage 2 at noise level T: the UNet's features of each (sentence, T), run at UNet `timestep`."""

    t: int
    timestep: int  # T, unless --timestep says otherwise (VPD: 1)
    unit = "sample"

    @property
    def key(self) -> int:
        return self.t

    @property
    def title(self) -> str:
        return f"UNet T={self.t}"

    def __str__(self) -> str:
        return f"unet T={self.t}"

    def write(self, writer: CacheWriter, shard: slice, arrays: dict, skipped: np.ndarray) -> None:
        writer.write_features(self.t, shard, arrays, skipped)


Stage = Latents | Text | NoiseLevel
LATENTS, TEXT = Latents(), Text()


@dataclass(frozen=True)
class StageResult:
    """What one `run_stage` did: rows computed here, shards left to the other processes holding them."""

    computed: int
    held_by_others: int
