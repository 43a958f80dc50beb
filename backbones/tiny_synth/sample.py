"""DDIM sampling with classifier-free guidance, and the grid of samples next to real scenes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw

from refseg.backbones.loading import load_backbone
from refseg.backbones.tiny_synth.data import SAMPLE_STREAM, render_scenes, to_uint8

CAPTION_WIDTH = 300  # px of text beside each row
LINE_CHARS = 48


@torch.inference_mode()
def generate(backbone, captions: list[str], *, steps: int = 40, guidance: float = 4.0, image_size: int = 128,
             generator: torch.Generator | None = None, token_length: int = 77) -> np.ndarray:
    """uint8 (N, S, S, 3) samples, one per caption, from a loaded `Backbone` (DDIM, eta 0)."""
    scheduler = DDIMScheduler.from_config(backbone.scheduler_config)
    scheduler.set_timesteps(steps)
    tok = backbone.tokenizer
    ids = tok(list(captions) + [""], padding="max_length", max_length=token_length, truncation=True,
              return_tensors="pt").input_ids.to(backbone.device)
    enc = backbone.text_encoder(ids)[0]
    cond, uncond = enc[:-1], enc[-1:].expand(len(captions), -1, -1)
    both = torch.cat([uncond, cond])
    side = image_size // backbone.vae_scale_factor
    z = torch.randn((len(captions), backbone.vae.config.latent_channels, side, side), generator=generator)
    z = z.to(backbone.device, backbone.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps_u, eps_c = backbone.unet(torch.cat([z, z]), t, both).sample.chunk(2)
        z = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
    return to_uint8(backbone.vae.decode(z / backbone.scaling_factor).sample)


def write_grid(model: str, out, *, count: int = 12, samples: int = 2, steps: int = 40, guidance: float = 4.0,
               seed: int = 0, image_size: int = 128) -> Path:
    """Rows: a real scene, `samples` samples for its caption, the caption. Scenes come from a stream
    of their own (neither training scenes nor the referring dataset's)."""
    backbone = load_backbone(model, device="cpu", dtype="fp32")
    real, captions = render_scenes(seed, count, image_size, stream=SAMPLE_STREAM)
    g = torch.Generator().manual_seed(seed)
    fakes = generate(backbone, [c for c in captions for _ in range(samples)], steps=steps, guidance=guidance,
                     image_size=image_size, generator=g)
    s, gap = image_size, 4
    width = (1 + samples) * (s + gap) + CAPTION_WIDTH
    grid = Image.new("RGB", (width, count * (s + gap) + 20), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 4), "real scene", fill="black")
    draw.text((s + gap + 2, 4), f"samples: DDIM {steps} steps, guidance {guidance}, model {model}", fill="black")
    for r in range(count):
        y = 20 + r * (s + gap)
        grid.paste(Image.fromarray(real[r]), (0, y))
        for k in range(samples):
            grid.paste(Image.fromarray(fakes[r * samples + k]), ((1 + k) * (s + gap), y))
        text = "\n".join(textwrap.wrap(captions[r], LINE_CHARS))
        draw.multiline_text(((1 + samples) * (s + gap) + 4, y + 2), text, fill="black", spacing=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    return out
