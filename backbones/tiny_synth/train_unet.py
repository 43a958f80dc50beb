"""Stage B: the text-conditioned UNet learns DDPM's epsilon objective on the autoencoder's scaled latents,
with the CLIP text encoder trained alongside and the caption dropped for classifier-free guidance."""

from __future__ import annotations

from pathlib import Path

import torch

from refseg.backbones.tiny_synth import checkpoint
from refseg.backbones.tiny_synth.config import TrainConfig, learning_rate
from refseg.backbones.tiny_synth.data import step_generator

STAGE = 2
LOG_EVERY = 25


@torch.inference_mode()
def encode_posteriors(vae, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image's latent (unscaled), computed once for stage B."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start:start + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def scaling_factor(latent_means: torch.Tensor) -> float:
    """Stable Diffusion's rule: 1 / std of the latents, so the scaled latents have unit variance."""
    return float(1.0 / latent_means.double().std())


def tokenize(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def diffusion_loss(unet, text_encoder, scheduler, z0, ids, generator, t: torch.Tensor | None = None) -> torch.Tensor:
    """ε-prediction MSE at timesteps `t` (drawn from `generator` after the noise when None)."""
    noise = torch.randn(z0.shape, generator=generator)
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
    zt = scheduler.add_noise(z0, noise, t)
    pred = unet(zt, t, text_encoder(ids)[0]).sample
    return (pred - noise).pow(2).mean()


def train_unet(unet, text_encoder, scheduler, posteriors, scale: float, token_ids: torch.Tensor,
               empty_ids: torch.Tensor, cfg: TrainConfig, work: Path, log, checkpoint_seconds: float) -> dict:
    """Train `unet` (and `text_encoder` when cfg.train_text_encoder) in place; resumes from work/unet.pt."""
    path = work / "unet.pt"
    means, stds = posteriors
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    text_encoder.requires_grad_(cfg.train_text_encoder)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.999), weight_decay=1e-2)
    run = checkpoint.StageCheckpoint(path, cfg.stage_b(), {"unet": unet, "text_encoder": text_encoder}, opt,
                                     "stage B", cfg.unet_steps, log, checkpoint_seconds)
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    window: list[float] = []

    while run.step < cfg.unet_steps:
        g = step_generator(cfg.seed, STAGE, run.step)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.unet_lr, run.step, cfg.unet_steps, cfg.warmup_steps)
        idx = torch.randint(0, means.shape[0], (cfg.unet_batch,), generator=g)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], token_ids[idx])
        loss = diffusion_loss(unet, text_encoder, scheduler, z0, ids, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.step += 1
        window.append(loss.item())
        if run.step % LOG_EVERY == 0 or run.step == cfg.unet_steps:
            run.history.append({"step": run.step, "mse": sum(window) / len(window)})
            window = []
            log(f"stage B step {run.step}/{cfg.unet_steps} eps-mse {run.history[-1]['mse']:.4f} "
                f"({run.elapsed():.0f}s)")
        run.tick()
    unet.eval()
    text_encoder.eval()
    return run.finish()


@torch.inference_mode()
def held_out_loss(unet, text_encoder, scheduler, z0, ids, empty_ids, seed: int, timesteps=(50, 250, 500, 750)) -> dict:
    """Epsilon MSE on held-out scenes at fixed timesteps, with their captions and with the empty one
    (a caption that helps denoise is a caption the model reads)."""
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    conditions = {"caption": text_encoder(ids)[0],
                  "empty": text_encoder(empty_ids[None, :])[0].expand(z0.shape[0], -1, -1)}
    out = {}
    for t in timesteps:
        tt = torch.full((z0.shape[0],), t, dtype=torch.long)
        zt = scheduler.add_noise(z0, noise, tt)
        for name, enc in conditions.items():
            out[f"t{t}_{name}"] = (unet(zt, tt, enc).sample - noise).pow(2).mean().item()
    return out
