"""The stages of extraction as small types: what the store calls each.

A stage names its rows' claims and done flags in the store (`key`: "images", "text" or the noise
level T, as cache/writer.py spells them; `CacheWriter.stage(key)` is its handle there, which writes
its shards), and says what it is only when printed (`str(stage)` in the report, `title` on its
progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass

from refseg.core.noise import NoiseInput


@dataclass(frozen=True)
class Latents:
    """Stage 1a: the VAE latent of each image (arrays: "latent")."""

    key = "images"
    unit = "img"
    title = "VAE (images)"

    def __str__(self) -> str:
        return "vae (images)"


@dataclass(frozen=True)
class Text:
    """Stage 1b: tokens, text embedding and ground-truth mask of each sentence."""

    key = "text"
    unit = "sent"
    title = "text + masks"

    def __str__(self) -> str:
        return "text encoder (sentences)"


@dataclass(frozen=True)
class NoiseLevel:
    """Stage 2 at one noise level: the denoiser's features of each (sentence, T), run as `noise` says.

    `t` is the store group (tNNNN): the T asked for, or for --noise-sigma the T of nearest SNR.
    """

    noise: NoiseInput
    unit = "sample"

    @property
    def t(self) -> int:
        return self.noise.level

    @property
    def key(self) -> int:
        return self.t

    @property
    def _name(self) -> str:
        if self.noise.t is None:  # --noise-sigma
            return f"σ={self.noise.sigma:g} (t{self.t:04d})"
        return f"T={self.t}"

    @property
    def title(self) -> str:
        return f"{'UNet' if self.noise.kind == 'ddpm' else 'DiT'} {self._name}"

    def __str__(self) -> str:
        return f"{'unet' if self.noise.kind == 'ddpm' else 'transformer'} {self._name}"


Stage = Latents | Text | NoiseLevel
LATENTS, TEXT = Latents(), Text()


@dataclass(frozen=True)
class StageResult:
    """What one `run_stage` did: rows computed here, shards left to the other processes holding them."""

    computed: int
    held_by_others: int
