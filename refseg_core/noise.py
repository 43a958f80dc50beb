"""The forward-noising step: ᾱ from a checkpoint's scheduler config, and ε that depends on nothing
but (noise seed, image_id, T).

torch only (no diffusers), so a cache can be re-derived or checked where diffusers is absent.
ᾱ is computed exactly as diffusers' schedulers compute it (float32 betas, float32 cumprod), so
`add_noise` matches `DDPMScheduler.add_noise` bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

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


# ---- one noise convention across DDPM and flow-matching models (docs/DESIGN.md §5) ----------------
#
# `--noise-t T` means SD's DDPM scale everywhere: on a DDPM model (SD1.x/2.x/XL) z_T = sqrt(ᾱ_T)·z0 +
# sqrt(1-ᾱ_T)·ε with the model's own ᾱ; on a flow-matching model (SD3, FLUX) z_σ = (1-σ)·z0 + σ·ε at
# the σ whose SNR ((1-σ)/σ)² equals SD's ᾱ_T/(1-ᾱ_T), i.e. σ = 1/(1 + sqrt(SNR_SD(T))). T = 0 is
# z0 itself on both (no noise; SNR infinite, stored as null). `--noise-sigma σ` gives σ directly
# (flow models only); its store group is tNNNN of the T whose SD SNR is nearest in log-SNR, and the
# exact σ is an attribute of the group (two different σ never share a group: refused).

DDPM, FLOW = "ddpm", "flow"
# Stable Diffusion's training schedule: the reference scale of --noise-t for every family.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SIGMA_MATCH = 1e-9  # two σ closer than this are the same noise level


def _sd_alphas_cumprod() -> torch.Tensor:
    return alphas_cumprod(SD_SCHEDULE)


def ddpm_snr(alpha_bar: float) -> float | None:
    """ᾱ/(1-ᾱ); None when infinite (ᾱ = 1: no noise)."""
    return None if alpha_bar >= 1.0 else float(alpha_bar / (1.0 - alpha_bar))


def flow_snr(sigma: float) -> float | None:
    """((1-σ)/σ)² of z_σ = (1-σ)·z0 + σ·ε; None when infinite (σ = 0: no noise)."""
    return None if sigma <= 0.0 else float(((1.0 - sigma) / sigma) ** 2)


def sd_snr(t: int) -> float | None:
    """SD's SNR at DDPM step T (None at T = 0, which refseg runs noise-free)."""
    return None if int(t) == 0 else ddpm_snr(float(_sd_alphas_cumprod()[int(t)]))


def flow_sigma_for_t(t: int) -> float:
    """The flow time σ with SD's SNR at T: 1/(1 + sqrt(SNR_SD(T))); T = 0 -> 0."""
    snr = sd_snr(t)
    return 0.0 if snr is None else 1.0 / (1.0 + math.sqrt(snr))


def nearest_sd_t(sigma: float) -> int:
    """The DDPM step T (0..999) whose SD SNR is nearest σ's in log-SNR: the store group of a σ level."""
    if sigma == 0.0:
        return 0
    acp = _sd_alphas_cumprod()[1:]
    log_snr_sd = torch.log(acp / (1 - acp))
    return 1 + int(torch.argmin((log_snr_sd - 2 * math.log((1 - sigma) / sigma)).abs()))


@dataclass(frozen=True)
class NoiseInput:
    """One noise level as a model runs it, and as the store records it (tNNNN attributes).

    `level`: the store key (group tNNNN): T when `t` is given, else `nearest_sd_t(sigma)`.
    `t`: the DDPM-scale T the user asked for (None for --noise-sigma). `kind`: "ddpm" | "flow".
    `alpha_bar` (ddpm) or `sigma` (flow) as applied (T = 0: 1.0 / 0.0, no noise); `snr` (None =
    infinite); `model_timestep`: exactly what the denoiser is given (UNet: int T or --timestep;
    SD3: σ·1000; FLUX: σ).
    """

    level: int
    t: int | None
    kind: str
    snr: float | None
    model_timestep: int | float
    alpha_bar: float | None = None
    sigma: float | None = None

    def to_attrs(self) -> dict:
        """The noise group's attributes (`noise_t` and `timestep` too, the two every store's readers know)."""
        attrs = {"noise_t": self.level, "timestep": self.model_timestep, "kind": self.kind, "snr": self.snr,
                 "model_timestep": self.model_timestep, "given": "t" if self.t is not None else "sigma"}
        attrs["alpha_bar" if self.kind == DDPM else "sigma"] = self.alpha_bar if self.kind == DDPM else self.sigma
        return attrs

    def same_level(self, attrs: dict) -> bool:
        """Whether a group's recorded attributes are this noise level (old groups: timestep only)."""
        if attrs.get("timestep") != self.model_timestep:
            return False
        if self.kind == FLOW and "sigma" in attrs:
            return abs(float(attrs["sigma"]) - float(self.sigma)) <= SIGMA_MATCH
        return attrs.get("kind", DDPM) == self.kind


def noise_input(scheduler_config: dict | None = None, *, kind: str = DDPM, t: int | None = None,
                sigma: float | None = None, timestep: int | None = None, timestep_scale: float = 1000.0) -> NoiseInput:
    """The `NoiseInput` for `--noise-t t` or `--noise-sigma sigma` on a model of `kind`.

    DDPM: ᾱ from `scheduler_config` (the model's own schedule), model timestep T or `timestep`
    (--timestep, e.g. VPD's 1). Flow: σ (from T by SD's SNR, or given), model timestep
    σ·`timestep_scale` (SD3 1000, FLUX 1). Exactly one of `t`, `sigma`.
    """
    if (t is None) == (sigma is None):
        raise ValueError("noise_input takes exactly one of t, sigma")
    if kind == DDPM:
        if sigma is not None:
            raise ModelError("--noise-sigma gives a flow-matching σ, but this model is a DDPM model (SD1.x/2.x/XL): "
                             "use --noise-t")
        acp = alphas_cumprod(scheduler_config or SD_SCHEDULE)
        if not 0 <= int(t) < len(acp):
            raise ModelError(f"--noise-t must be in 0..{len(acp) - 1} (got {t})")
        alpha_bar = 1.0 if int(t) == 0 else float(acp[int(t)])
        return NoiseInput(level=int(t), t=int(t), kind=DDPM, snr=ddpm_snr(alpha_bar), alpha_bar=alpha_bar,
                          model_timestep=int(t) if timestep is None else int(timestep))
    if kind != FLOW:
        raise ValueError(f"unknown noise kind {kind!r}")
    if timestep is not None:
        raise ModelError("--timestep is for UNet (DDPM) models; a flow-matching model runs at the σ of --noise-t "
                         "or --noise-sigma")
    if sigma is not None:
        sigma = float(sigma)
        if not 0.0 <= sigma < 1.0:
            raise ModelError(f"--noise-sigma must be in [0, 1) (got {sigma:g})")
        level, given_t = nearest_sd_t(sigma), None
    else:
        if not 0 <= int(t) < SD_SCHEDULE["num_train_timesteps"]:
            raise ModelError(f"--noise-t must be in 0..{SD_SCHEDULE['num_train_timesteps'] - 1} (got {t})")
        sigma, level, given_t = flow_sigma_for_t(int(t)), int(t), int(t)
    return NoiseInput(level=level, t=given_t, kind=FLOW, snr=flow_snr(sigma), sigma=sigma,
                      model_timestep=sigma * float(timestep_scale))


def noise_latents(z0: torch.Tensor, noise: NoiseInput, eps: torch.Tensor) -> torch.Tensor:
    """z0 noised to `noise` (float32): DDPM exactly as `add_noise` (bit for bit), flow (1-σ)·z0 + σ·ε."""
    if noise.kind == DDPM:
        if noise.alpha_bar >= 1.0:
            return z0.float()
        abar = torch.tensor([noise.alpha_bar], dtype=torch.float32, device=z0.device)
        return add_noise(z0, noise.level, eps, _single(noise.level, abar))
    z0 = z0.float()
    if noise.sigma == 0.0:
        return z0
    sigma = torch.tensor(noise.sigma, dtype=torch.float32, device=z0.device)
    return (1 - sigma) * z0 + sigma * eps.to(device=z0.device, dtype=torch.float32)


def _single(t: int, abar: torch.Tensor) -> torch.Tensor:
    """A stand-in ᾱ table whose entry `t` is `abar` (add_noise indexes the table at t)."""
    table = torch.ones(int(t) + 1, dtype=torch.float64)
    table[int(t)] = abar.double()
    return table


def recorded_noise(attrs: dict, backbone_settings: dict) -> dict:
    """A noise group's ᾱ/σ, SNR, model timestep and kind: as recorded, or for a group that records only
    `noise_t` and `timestep` (DDPM, SD-family) computed from the store's recorded scheduler settings;
    keys "not recorded" where neither is possible."""
    if "kind" in attrs:
        return {k: attrs.get(k) for k in ("kind", "alpha_bar", "sigma", "snr", "model_timestep", "given")
                if k in attrs}
    t = int(attrs["noise_t"])
    scheduler = {k: v for k, v in (backbone_settings.get("scheduler") or {}).items() if v is not None}
    try:
        if "beta_schedule" not in scheduler and "trained_betas" not in scheduler:
            raise ValueError("no schedule recorded")
        n = noise_input(scheduler, t=t, timestep=attrs.get("timestep"))
    except (ModelError, ValueError):
        return {"kind": "ddpm", "model_timestep": attrs.get("timestep"), "alpha_bar": "not recorded",
                "snr": "not recorded", "given": "t"}
    return {k: v for k, v in n.to_attrs().items() if k not in ("noise_t", "timestep")}
