"""`tiny`: a randomly initialised backbone with Stable Diffusion 1.x's topology at toy size.

Same structure as SD (4 UNet levels, CrossAttn×3 + plain down/up blocks, 2 layers per block, so
5 `attn2` layers at strides 32 and 16 as in SD; VAE ×8 with 4 latent channels; a CLIP text
encoder and byte-level BPE tokenizer) but a few hundred thousand weights, so extraction at
64–128 px is cheap on a CPU (BENCHMARKS.md, "Extraction: tiny"). Deterministic from `seed`: each component is built right
after `torch.manual_seed`, so the same seed gives the same weights, byte for byte.
"""

from __future__ import annotations

import torch

from refseg.backbones.tokenizer_vocab import build_tokenizer

TEXT_DIM = 32
TOKEN_LIMIT = 77  # CLIP's context length; --token-length must not exceed it

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=2,  # diffusers' (legacy) name for the number of heads, as in SD's config (8)
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=32,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=128,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=TOKEN_LIMIT,
    hidden_act="quick_gelu",
)

# Stable Diffusion's training schedule (its scheduler_config.json, as a DDPMScheduler).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_tiny(seed: int = 0) -> dict:
    """The tiny backbone's components: vae, unet, text_encoder, tokenizer, scheduler (fp32, CPU, eval)."""
    return build_sd_parts(seed, build_tokenizer(model_max_length=TOKEN_LIMIT), UNET_CONFIG, TEXT_CONFIG,
                          SCHEDULER_CONFIG)


def build_sd_parts(seed: int, tokenizer, unet_config: dict, text_config: dict, scheduler_config: dict) -> dict:
    """A random SD-topology backbone (this file's VAE; `unet_config`, a CLIP text encoder of `text_config`):
    each component built right after `torch.manual_seed` (seed, seed + 1, seed + 2), so the same seed
    gives the same weights, byte for byte. Shared by `tiny` and `tiny-sd2`."""
    # deferred: heavy, and the family registry imports this module
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text_config,
    ))
    for m in (vae, unet, text_encoder):
        m.eval()
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDPMScheduler(**scheduler_config))
