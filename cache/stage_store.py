"""`StageStore`: one extraction stage's handle on a store, so the pipeline asks the store once per stage.

A stage is "images" (VAE latents), "text" (tokens, embeddings, GT masks) or a noise level T (the
denoiser's features). Its handle says which whole shards are left (`todo`), claims and releases them
among the processes writing the store (`claim`, `release`), writes a finished shard (`write`) and
says whether the stage is finished (`finished`). `CacheWriter.stage(key)` makes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from refseg.cache.writer import CacheWriter


class StageStore:
    def __init__(self, writer: "CacheWriter", key, finite_checked: bool = False):
        self.writer, self.key = writer, key
        # the caller refused non-finite features already (on the device): the host need not look again
        self.finite_checked = finite_checked

    def todo(self, part: tuple[int, int] = (0, 1)) -> list[slice]:
        """The shards of `part` (i, n) not finished yet (done, or skipped as bad)."""
        if self.key == "images":
            return self.writer.image_shards_todo(part)
        if self.key == "text":
            return self.writer.text_shards_todo(part)
        return self.writer.feature_shards_todo(self.key, part)

    def claim(self, shards: list[slice]) -> tuple[list[slice], list[slice]]:
        """(claimed by this process, held by another): see `CacheWriter.claim_shards`."""
        return self.writer.claim_shards(self.key, shards)

    def release(self, shards: list[slice]) -> None:
        self.writer.release_shards(self.key, shards)

    def write(self, shard: slice, arrays: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        """Write one whole shard of this stage (`arrays` by the stage's names; `skipped` rows: zeros)."""
        if self.key == "images":
            self.writer.write_latents(shard, arrays["latent"])  # an unreadable image's is zeros: see record_bad
        elif self.key == "text":
            self.writer.write_text(shard, **arrays)  # input_ids, attention_mask, embedding, gt (+ pooled)
        else:
            self.writer.write_features(self.key, shard, arrays, skipped, checked=self.finite_checked)

    def finished(self) -> bool:
        """Whether every shard of the stage is finished, by this process or another."""
        return not self.todo()
