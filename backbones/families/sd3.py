"""Family "sd3": Stable Diffusion 3 / 3.5 (MMDiT), a `TransformerFamily` (transformer.py).

SD3's text context, as `StableDiffusion3Pipeline.encode_prompt` builds it: CLIP-L and CLIP-G
(`CLIPTextModelWithProjection`) each tokenized to CLIP's 77 positions, their penultimate hidden
states concatenated on channels and zero-padded to T5's width, then T5's `--token-length` tokens
appended along the sequence; pooled = CLIP-L's and CLIP-G's projected pooled outputs concatenated.
So the text sequence (the maps' token axis, `text/input_ids`) is 77 CLIP-L ids, then the T5 ids.
The transformer runs at timestep σ x 1000 (the pipeline's `scheduler.timesteps`).

`tiny-sd3` has SD3.5-medium's topology at toy size: joint blocks with RMSNorm q/k norms, a dual
(image-only `attn2`) block first, the last block `context_pre_only`; CLIP-L + CLIP-G + T5 (gated-GELU,
as T5-XXL v1.1) with tokenizers built in code.
"""

from __future__ import annotations

import torch

from refseg.backbones.families.base import TextConditioning
from refseg.backbones.families.transformer import (CLIP_TOKENS, T5_TOKEN_LIMIT, TINY_T5_CONFIG, TransformerFamily,
                                                   build_clip, build_t5, pad_tokens, scheduler_config)
from refseg.backbones.t5_tokenizer import build_t5_tokenizer
from refseg.backbones.tokenizer_vocab import build_tokenizer

# ---- tiny-sd3 ------------------------------------------------------------------------------------
CLIP_L_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=CLIP_TOKENS, projection_dim=16, hidden_act="quick_gelu")
CLIP_G_CONFIG = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=CLIP_TOKENS, projection_dim=24, hidden_act="gelu")
SD3_TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=TINY_T5_CONFIG["d_model"], caption_projection_dim=16,
    pooled_projection_dim=CLIP_L_CONFIG["projection_dim"] + CLIP_G_CONFIG["projection_dim"],
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)
# SD3's VAE: 16 channels, no quant convs, z = (x - shift) x scale with SD3's factors.
SD3_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    latent_channels=16, norm_num_groups=32, sample_size=128, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


class SD3Family(TransformerFamily):
    name = "sd3"
    tiny_name = "tiny-sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    flow_timestep_scale = 1000.0  # the pipeline passes scheduler.timesteps = σ x 1000
    text_encoders = {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                     "text_encoder_3": "T5EncoderModel"}
    tokenizers = {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"}

    def build_tiny(self, seed: int = 0) -> dict:
        from diffusers import AutoencoderKL, SD3Transformer2DModel  # deferred: heavy (see transformer.py)

        parts = dict(tokenizer=build_tokenizer(model_max_length=CLIP_TOKENS),
                     tokenizer_2=build_tokenizer(model_max_length=CLIP_TOKENS),
                     tokenizer_3=build_t5_tokenizer(model_max_length=T5_TOKEN_LIMIT))
        torch.manual_seed(seed)
        parts["vae"] = AutoencoderKL(**SD3_VAE_CONFIG)
        torch.manual_seed(seed + 1)
        parts["transformer"] = SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG)
        torch.manual_seed(seed + 2)
        parts["text_encoder"] = build_clip(CLIP_L_CONFIG, parts["tokenizer"], "CLIPTextModelWithProjection")
        torch.manual_seed(seed + 3)
        parts["text_encoder_2"] = build_clip(CLIP_G_CONFIG, parts["tokenizer_2"], "CLIPTextModelWithProjection")
        torch.manual_seed(seed + 4)
        parts["text_encoder_3"] = build_t5(parts["tokenizer_3"])
        for name in ("vae", "transformer", *self.text_encoders):
            parts[name].eval()
        parts["scheduler_config"] = scheduler_config(**SD3_SCHEDULER_CONFIG)
        return parts

    def clip_length(self, components: dict) -> int:
        return int(components["tokenizer"].model_max_length)

    def text_length(self, components: dict, token_length: int) -> int:
        return self.clip_length(components) + token_length

    def tokenize(self, components: dict, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        clip_l = pad_tokens(components["tokenizer"], texts, self.clip_length(components))
        clip_g = pad_tokens(components["tokenizer_2"], texts, self.clip_length(components))
        t5 = pad_tokens(components["tokenizer_3"], texts, token_length)
        return {"input_ids": torch.cat([clip_l["input_ids"], t5["input_ids"]], dim=1),
                "attention_mask": torch.cat([clip_l["attention_mask"], t5["attention_mask"]], dim=1),
                "clip_ids": clip_l["input_ids"], "clip_ids_2": clip_g["input_ids"], "t5_ids": t5["input_ids"]}

    def encode_text(self, components: dict, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        hidden, pooled = [], []
        for name, key in (("text_encoder", "clip_ids"), ("text_encoder_2", "clip_ids_2")):
            encoder = components[name]
            out = encoder(tokens[key].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as the pipeline (clip_skip None)
            pooled.append(out[0])  # text_embeds: the projected pooled output
        t5 = components["text_encoder_3"]
        t5_hidden = t5(tokens["t5_ids"].to(t5.device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return TextConditioning(torch.cat([clip.to(t5_hidden.dtype), t5_hidden], dim=-2),
                                torch.cat(pooled, dim=-1))

    def forward(self, components: dict, latents: torch.Tensor, noise, text: TextConditioning) -> torch.Tensor:
        transformer = components["transformer"]
        dtype = transformer.dtype
        steps = torch.full((len(latents),), float(noise.model_timestep), dtype=torch.float32, device=latents.device)
        return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=text.embedding.to(dtype),
                           pooled_projections=text.pooled.to(dtype), timestep=steps, return_dict=False)[0]


FAMILY = SD3Family()
