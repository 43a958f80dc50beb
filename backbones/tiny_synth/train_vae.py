"""Stage A: the KL autoencoder learns to reconstruct synthetic scenes (L1 + L2 + a small KL; no GAN)."""

from __future__ import annotations

from pathlib import Path

import torch

from refseg.backbones.tiny_synth import checkpoint
from refseg.backbones.tiny_synth.config import TrainConfig, learning_rate
from refseg.backbones.tiny_synth.data import step_generator

STAGE = 1
LOG_EVERY = 25


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    l1 = (recon - x).abs().mean()
    l2 = (recon - x).pow(2).mean()
    kl = posterior.kl().mean() / z[0].numel()  # diffusers sums the KL over the latent: per element here
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def random_crops(images: torch.Tensor, count: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, images.shape[0], (count,), generator=generator)
    room = images.shape[-1] - crop + 1
    offsets = torch.randint(0, room, (count, 2), generator=generator)
    return torch.stack([images[i, :, y:y + crop, x:x + crop] for i, (y, x) in zip(idx.tolist(), offsets.tolist())])


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, work: Path, log, checkpoint_seconds: float) -> dict:
    """Train `vae` in place on `images` ((N, 3, S, S) in [-1, 1]); resumes from work/vae.pt."""
    path = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = checkpoint.StageCheckpoint(path, cfg.stage_a(), {"vae": vae}, opt, "stage A", cfg.vae_steps, log,
                                     checkpoint_seconds)
    vae.train()
    window: list[dict] = []

    crop = min(cfg.vae_crop, cfg.image_size)
    while run.step < cfg.vae_steps:
        g = step_generator(cfg.seed, STAGE, run.step)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.vae_lr, run.step, cfg.vae_steps, cfg.warmup_steps)
        x = random_crops(images, cfg.vae_batch, crop, g)
        loss, parts = vae_loss(vae, x, g, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run.step += 1
        window.append(parts)
        if run.step % LOG_EVERY == 0 or run.step == cfg.vae_steps:
            mean = {k: sum(p[k] for p in window) / len(window) for k in window[0]}
            run.history.append({"step": run.step, **mean})
            window = []
            log(f"stage A step {run.step}/{cfg.vae_steps} l1 {mean['l1']:.4f} l2 {mean['l2']:.5f} "
                f"kl {mean['kl']:.3f} ({run.elapsed():.0f}s)")
        run.tick()
    vae.eval()
    return run.finish()


@torch.inference_mode()
def reconstruction_error(vae, images: torch.Tensor, batch: int = 8) -> dict:
    """Mean L1 / L2 of decode(mode(encode(x))) against x, in [-1, 1] units, and the PSNR (8-bit scale)."""
    l1 = l2 = 0.0
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        l1 += (recon - x).abs().sum().item()
        l2 += (recon - x).pow(2).sum().item()
    n = images.numel()
    mse_01 = l2 / n / 4  # [-1, 1] -> [0, 1]
    return {"l1": l1 / n, "l2": l2 / n, "psnr": float(10 * torch.log10(torch.tensor(1.0 / mse_01)))}
