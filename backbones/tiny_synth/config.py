"""What a tiny-synth training run is made of; every field goes into the checkpoints and the model card."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    scenes: int = 3000  # training scenes (rendered once; stage B sees each many times)
    image_size: int = 128  # the demo's extraction size: latents 16×16
    # stage A: the KL autoencoder, on random crops (the VAE is convolutional, crops are 4× cheaper)
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5  # per latent element, against per-pixel L1 + L2: a light leash, no GAN
    # stage B: UNet + CLIP text encoder, DDPM epsilon objective on scaled latents
    unet_steps: int = 1600
    unet_batch: int = 32
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # classifier-free guidance: the caption is replaced by "" this often
    train_text_encoder: bool = True
    token_length: int = 77  # CLIP's context, as Stable Diffusion pads captions
    warmup_steps: int = 50

    def as_dict(self) -> dict:
        return asdict(self)

    def stage_a(self) -> dict:
        """The settings stage A's result depends on (its checkpoint must match them to be resumed)."""
        return {k: v for k, v in asdict(self).items() if k in STAGE_A_KEYS}

    def stage_b(self) -> dict:
        """Everything: stage B starts from stage A's autoencoder."""
        return asdict(self)


STAGE_A_KEYS = ("seed", "scenes", "image_size", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "kl_weight",
                "warmup_steps")


def learning_rate(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `base` (a function of the step: resume-safe)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
