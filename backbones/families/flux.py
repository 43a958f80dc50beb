"""Family "flux": FLUX.1 (dev and schnell): double-stream blocks, then single-stream blocks.

Built on `TransformerFamily` (transformer.py). As `FluxPipeline` runs it:
- latents (B, 16, h, w) are packed into 2x2 patches (`pack_latents` = `FluxPipeline._pack_latents`:
  (B, h/2 x w/2, 64)), with `img_ids` (0, row, col) per patch (`_prepare_latent_image_ids`) and
  `txt_ids` all zero; the rotary embedding covers the text positions, then the image positions;
- the text context is T5's last hidden state over `--token-length` tokens (the pipeline's
  max_sequence_length), so the maps' token axis is T5's and `text/input_ids` holds T5 ids; pooled =
  CLIP-L's pooled output (`CLIPTextModel.pooler_output`, 77 tokens);
- the transformer gets timestep σ (the pipeline passes timestep / 1000; the model multiplies by 1000)
  and, when its config has `guidance_embeds` (FLUX.1-dev), guidance `GUIDANCE` = 3.5, the dev
  pipeline's default guidance_scale (recorded in the backbone identity, so a store says what it
  ran with). schnell has no guidance embedding and gets none.

`tiny-flux` is dev-like (`guidance_embeds=True`): 2 double-stream and 4 single-stream blocks,
RoPE axes (4, 6, 6) over 16-dim heads, CLIP-L + T5 with tokenizers built in code.
"""

from __future__ import annotations

import torch

from refseg.backbones.families.base import TextConditioning
from refseg.backbones.families.transformer import (CLIP_TOKENS, T5_TOKEN_LIMIT, TransformerFamily, build_clip,
                                                   build_t5, pad_tokens, scheduler_config)
from refseg.backbones.t5_tokenizer import build_t5_tokenizer
from refseg.backbones.tokenizer_vocab import build_tokenizer

GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev)

# ---- tiny-flux -----------------------------------------------------------------------------------
FLUX_CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=CLIP_TOKENS, hidden_act="quick_gelu")
FLUX_T5_DIM = 48
FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=FLUX_T5_DIM, pooled_projection_dim=FLUX_CLIP_CONFIG["hidden_size"], guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
# FLUX's VAE: 16 channels, no quant convs, z = (x - shift) x scale with FLUX's factors.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    latent_channels=16, norm_num_groups=32, sample_size=128, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)
# FLUX.1-dev's scheduler (the shift only shapes the sampling schedule; refseg gives σ directly).
FLUX_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


class FluxFamily(TransformerFamily):
    name = "flux"
    tiny_name = "tiny-flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    flow_timestep_scale = 1.0  # the pipeline passes σ (timestep / 1000)
    text_encoders = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    tokenizers = {"tokenizer": "clip", "tokenizer_2": "t5"}

    def build_tiny(self, seed: int = 0) -> dict:
        from diffusers import AutoencoderKL, FluxTransformer2DModel  # deferred: heavy (see transformer.py)

        tokenizer_2 = build_t5_tokenizer(model_max_length=T5_TOKEN_LIMIT)
        parts = dict(tokenizer=build_tokenizer(model_max_length=CLIP_TOKENS), tokenizer_2=tokenizer_2)
        torch.manual_seed(seed)
        parts["vae"] = AutoencoderKL(**FLUX_VAE_CONFIG)
        torch.manual_seed(seed + 1)
        parts["transformer"] = FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG)
        torch.manual_seed(seed + 2)
        parts["text_encoder"] = build_clip(FLUX_CLIP_CONFIG, parts["tokenizer"], "CLIPTextModel")
        torch.manual_seed(seed + 3)
        parts["text_encoder_2"] = build_t5(tokenizer_2, d_model=FLUX_T5_DIM)
        for name in ("vae", "transformer", *self.text_encoders):
            parts[name].eval()
        parts["scheduler_config"] = scheduler_config(**FLUX_SCHEDULER_CONFIG)
        return parts

    def identity_extras(self, components: dict) -> dict:
        return {"guidance": self.guidance(components)}

    def guidance(self, components: dict) -> float | None:
        return GUIDANCE if components["transformer"].config.get("guidance_embeds") else None

    def tokenize(self, components: dict, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        t5 = pad_tokens(components["tokenizer_2"], texts, token_length)
        clip = pad_tokens(components["tokenizer"], texts, int(components["tokenizer"].model_max_length))
        return {"input_ids": t5["input_ids"], "attention_mask": t5["attention_mask"], "clip_ids": clip["input_ids"]}

    def encode_text(self, components: dict, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        clip, t5 = components["text_encoder"], components["text_encoder_2"]
        pooled = clip(tokens["clip_ids"].to(clip.device), output_hidden_states=False).pooler_output
        return TextConditioning(t5(tokens["input_ids"].to(t5.device), output_hidden_states=False)[0], pooled)

    def forward(self, components: dict, latents: torch.Tensor, noise, text: TextConditioning) -> torch.Tensor:
        transformer = components["transformer"]
        dtype, device = transformer.dtype, latents.device
        b = len(latents)
        txt_ids = torch.zeros(text.embedding.shape[1], 3, device=device, dtype=text.embedding.dtype)
        guidance = self.guidance(components)
        if guidance is not None:
            guidance = torch.full([1], guidance, device=device, dtype=torch.float32).expand(b)
        steps = torch.full((b,), float(noise.model_timestep), dtype=torch.float32, device=device).to(dtype)
        out = transformer(hidden_states=pack_latents(latents.to(dtype)), timestep=steps, guidance=guidance,
                          pooled_projections=text.pooled.to(dtype), encoder_hidden_states=text.embedding.to(dtype),
                          txt_ids=txt_ids, img_ids=latent_image_ids(latents, text.embedding.dtype),
                          return_dict=False)[0]
        return unpack_latents(out, latents.shape)


# FluxPipeline's _pack_latents, _prepare_latent_image_ids and _unpack_latents, restated here because
# importing the pipeline class pulls in image processors that warn on stderr; a test checks they agree.
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 x w/2, 4C): 2x2 patches, row-major."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `shape` (B, C, h, w)."""
    b, c, h, w = shape
    packed = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return packed.reshape(b, c, h, w)


def latent_image_ids(latents: torch.Tensor, dtype) -> torch.Tensor:
    """(h/2 x w/2, 3): (0, row, col) of each packed patch, the image positions of FLUX's RoPE."""
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=latents.device, dtype=dtype)


FAMILY = FluxFamily()
