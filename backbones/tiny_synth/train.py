"""The whole tiny-synth run: render scenes, stage A (VAE), stage B (UNet + text encoder), export.

Deterministic from `TrainConfig.seed` on a given machine and thread count: weights start from
`build_tiny(seed)`, scene i is drawn from its own seed, and every training step draws its crops,
noise, timesteps and caption drop-outs from a generator seeded by (seed, stage, step). Checkpoints
hold the weights and optimiser state, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch
from diffusers.utils import logging as dlog

from refseg.backbones.loading import save_backbone, weights_sha256
from refseg.backbones.tiny import build_tiny
from refseg.backbones.tiny_synth.config import TrainConfig
from refseg.backbones.tiny_synth.data import render_scenes, to_model_range
from refseg.backbones.tiny_synth.train_unet import encode_posteriors, held_out_loss, scaling_factor, tokenize, train_unet
from refseg.backbones.tiny_synth.train_vae import reconstruction_error, train_vae
from refseg.core.errors import RunError

HELD_OUT = 32  # scenes after the training ones, for the losses the model card reports


def train(cfg: TrainConfig, work, out=None, *, resume: bool = False, log=print,
          checkpoint_seconds: float = 180.0, held_out: int = HELD_OUT) -> dict:
    """Run (or resume) both stages in `work`; export the diffusers folder to `out` if given.

    Returns the training summary (also written as `work/summary.json` and `out/training.json`).
    """
    dlog.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if not resume and any((work / n).exists() for n in ("vae.pt", "unet.pt")):
        raise RunError(f"{work} already holds a training run: pass --resume to continue it, or use an empty --work")

    t0 = time.monotonic()
    parts = build_tiny(cfg.seed)
    vae, unet, text_encoder, tokenizer, scheduler = (parts[k] for k in
                                                     ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    images_u8, captions = render_scenes(cfg.seed, cfg.scenes + held_out, cfg.image_size)
    images = to_model_range(images_u8)
    train_images, held_images = images[:cfg.scenes], images[cfg.scenes:]
    log(f"rendered {cfg.scenes} + {held_out} scenes at {cfg.image_size}px ({time.monotonic() - t0:.0f}s)")

    state_a = train_vae(vae, train_images, cfg, work, log, checkpoint_seconds)
    recon = reconstruction_error(vae, held_images)
    log(f"stage A done: held-out l1 {recon['l1']:.4f} l2 {recon['l2']:.5f} psnr {recon['psnr']:.2f} dB")

    t1 = time.monotonic()
    posteriors = encode_posteriors(vae, train_images)
    scale = scaling_factor(posteriors[0])
    log(f"encoded {cfg.scenes} latents, scaling_factor {scale:.5f} ({time.monotonic() - t1:.0f}s)")
    token_ids = tokenize(tokenizer, captions[:cfg.scenes], cfg.token_length)
    empty_ids = tokenize(tokenizer, [""], cfg.token_length)[0]
    state_b = train_unet(unet, text_encoder, scheduler, posteriors, scale, token_ids, empty_ids, cfg, work, log,
                         checkpoint_seconds)

    held_z0 = encode_posteriors(vae, held_images)[0] * scale
    held = held_out_loss(unet, text_encoder, scheduler, held_z0,
                         tokenize(tokenizer, captions[cfg.scenes:], cfg.token_length), empty_ids, cfg.seed)
    log("stage B done: held-out eps-mse " + " ".join(f"{k} {v:.4f}" for k, v in held.items()))

    vae.register_to_config(scaling_factor=scale)
    summary = {
        "config": cfg.as_dict(),
        "scaling_factor": scale,
        "vae": {"steps": state_a["step"], "seconds": round(state_a["seconds"], 1),
                "final_train_loss": state_a["history"][-1], "held_out": recon},
        "unet": {"steps": state_b["step"], "seconds": round(state_b["seconds"], 1),
                 "final_train_loss": state_b["history"][-1], "held_out": held},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "weights_sha256_fp32": _sha(vae, unet, text_encoder),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "history.json").write_text(json.dumps({"vae": state_a["history"], "unet": state_b["history"]}) + "\n")
    if out is not None:
        export(parts, out, summary)
        log(f"wrote {out}")
    return summary


def _sha(vae, unet, text_encoder) -> str:
    return weights_sha256({"vae": vae, "unet": unet, "text_encoder": text_encoder})


def export(parts: dict, out, summary: dict) -> Path:
    """Write the trained parts as a diffusers folder in fp16 safetensors (what the package ships)."""
    out = Path(out)
    half = dict(parts)
    for name in ("vae", "unet", "text_encoder"):
        half[name] = copy.deepcopy(parts[name]).to(torch.float16)  # .to() on a module is in place
    save_backbone(half, out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
