"""The forward-noising step: ᾱ from a checkpoint's scheduler config, and ε that depends on nothing
but (noise seed, image_id, T).

torch only (no diffusers), so a cache can be re-derived or checked where diffusers is absent.
ᾱ is computed exactly as diffusers' schedulers compute it (float32 betas, float32 cumprod), so
`add_noise` matches `DDPMScheduler.add_noise` bit for bit.
"""

from __future__ import annotations

import hashlib
import math

import torch

from refseg.core.errors import ModelError


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's `squaredcos_cap_v2` schedule (diffusers' `betas_for_alpha_bar`)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """ᾱ_t for t = 0 … N-1 (indexed like diffusers: `alphas_cumprod[t]`), as float64.

    The values are diffusers' float32 ones, widened: what the checkpoint's own scheduler uses.
    """
    cfg = scheduler_config
    n = int(cfg.get("num_train_timesteps", 1000))
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":  # Stable Diffusion's
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ModelError(f"unsupported noise schedule beta_schedule={schedule!r} in the scheduler config "
                         "(supported: linear, scaled_linear, squaredcos_cap_v2, trained_betas)")
    if cfg.get("rescale_betas_zero_snr"):
        raise ModelError("scheduler config sets rescale_betas_zero_snr, which refseg does not support")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def noise_seed(seed: int, image_id: int, t: int) -> int:
    """A 63-bit generator seed from (noise seed, image_id, T); stable across runs, machines, versions."""
    digest = hashlib.sha256(f"refseg-noise:{int(seed)}:{int(image_id)}:{int(t)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_noise(shape, seed: int, image_id: int, t: int) -> torch.Tensor:
    """ε ~ N(0, I) of `shape` (one image's latent), float32 on the CPU.

    Drawn on the CPU from its own generator, so it is the same on any device and whatever the
    batch it lands in; move it to the device afterwards.
    """
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(seed, image_id, t))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def add_noise(z0: torch.Tensor, t, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """zT = sqrt(ᾱ_T)·z0 + sqrt(1-ᾱ_T)·ε in float32; T = 0 returns z0 itself (VPD's T = 0).

    `t` is an int (one T for the batch) or a 1-D tensor of per-sample T's; `z0` is (B, C, H, W)
    or (C, H, W). The result is float32 on z0's device.
    """
    z0 = z0.float()
    if isinstance(t, int) or (torch.is_tensor(t) and t.ndim == 0):
        if int(t) == 0:
            return z0
    t = torch.as_tensor(t, dtype=torch.long, device=z0.device).reshape(-1)
    abar = alphas_cumprod.to(device=z0.device, dtype=torch.float32)[t]
    shape = (-1,) + (1,) * (z0.ndim - 1) if t.numel() > 1 else (1,) * z0.ndim
    sqrt_a = (abar**0.5).reshape(shape)
    sqrt_1ma = ((1 - abar) ** 0.5).reshape(shape)
    zt = sqrt_a * z0 + sqrt_1ma * eps.to(device=z0.device, dtype=torch.float32)
    # Per-sample T's: a 0 among them also means "z0 itself".
    return torch.where((t == 0).reshape(shape), z0, zt) if (t == 0).any() else zt
