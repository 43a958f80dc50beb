"""Backbones for the benchmarks: `tiny` (refseg's built-in toy) and `sd15` (Stable Diffusion 1.5's
architecture with random weights: the FLOPs and memory traffic are those of the real model).

The SD1.5 configs are written out here (from the checkpoint's unet/, vae/ and text_encoder/
config.json) so that no download is needed. The text encoder is CLIP ViT-L/14's text tower; its
vocabulary is refseg's local BPE tokenizer (an embedding lookup: the vocabulary size changes no FLOP).
"""

from __future__ import annotations

import torch

from refseg.backbones.families import FAMILIES
from refseg.backbones.loading import Backbone, load_backbone

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_CONFIG = dict(  # CLIP ViT-L/14 text encoder
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)

ARCHS = ("tiny", "sd15")
DEFAULT_IMAGE_SIZE = {"tiny": 128, "sd15": 512}


def build_modules(arch: str, device="cpu", seed: int = 0) -> dict:
    """vae, unet, text_encoder (fp32, eval) and tokenizer of `arch`, built directly on `device`.

    `device="meta"` builds shapes only: what FLOP counting needs, in a fraction of a second.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from refseg.backbones import tiny
    from refseg.backbones.tokenizer_vocab import build_tokenizer

    if arch == "tiny":
        unet_cfg, vae_cfg, text_cfg = tiny.UNET_CONFIG, tiny.VAE_CONFIG, tiny.TEXT_CONFIG
    elif arch == "sd15":
        unet_cfg, vae_cfg, text_cfg = SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG
    else:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    tokenizer = build_tokenizer(model_max_length=77)
    with torch.device(device):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text_cfg))
    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)


def build_backbone(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Backbone:
    """A refseg `Backbone` (what extraction runs) for `arch`, random weights, on `device` in `dtype`."""
    if arch == "tiny":
        return load_backbone("tiny", device=device, dtype=dtype)
    from diffusers.utils import logging as diffusers_logging

    parts = build_modules(arch, device=device, seed=seed)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice on .to(dtype) is for pretrained checkpoints
    try:
        for name in ("vae", "unet", "text_encoder"):
            parts[name].to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    # hashing 1 B random weights would take longer than the benchmark: the seed names them
    identity = {"model": f"bench-{arch}-random", "kind": "bench", "weights_sha256": f"random-seed{seed}"}
    return Backbone(FAMILIES["sd"], dict(parts, scheduler_config=dict(SD15_SCHEDULER_CONFIG)), identity, device, dtype)


def save_folder(arch: str, out: str, device="cpu", seed: int = 0, dtype=torch.float16) -> str:
    """Write `arch` with random weights as a diffusers folder that `--model OUT` loads like real weights.

    Built on `device` (SD1.5's ~1.1 B parameters initialise in seconds on a GPU), saved in `dtype`
    (float16 halves the file, as the hub's fp16 variants do; refseg-extract casts on load).
    """
    import json
    import os

    from diffusers import DDPMScheduler

    parts = build_modules(arch, device=device, seed=seed)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].to(dtype).save_pretrained(os.path.join(out, name))
    parts["tokenizer"].save_pretrained(os.path.join(out, "tokenizer"))
    scheduler = dict(SD15_SCHEDULER_CONFIG) if arch == "sd15" else None
    if scheduler is None:
        from refseg.backbones import tiny

        scheduler = dict(tiny.SCHEDULER_CONFIG)
    DDPMScheduler(**scheduler).save_pretrained(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_note": f"refseg bench/models.py {arch}, random seed {seed}"}, f)
    return out


if __name__ == "__main__":  # python bench/models.py ARCH OUT [--device cuda]
    import argparse
    import os
    import sys

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    p = argparse.ArgumentParser(description="Save a random-weight backbone as a diffusers folder.")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("out")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(save_folder(a.arch, a.out, device=a.device))
