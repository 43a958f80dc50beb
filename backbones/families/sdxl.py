"""Family "sdxl": Stable Diffusion XL (base).

- Two text encoders: CLIP-L (`CLIPTextModel`) and OpenCLIP-G (`CLIPTextModelWithProjection`). The
  context is both encoders' *penultimate* hidden states (`hidden_states[-2]`, no final layer norm)
  concatenated on the feature axis: 768 + 1280 = 2048-d. The pooled embedding is encoder 2's
  `text_embeds` (its projected EOS state). Both exactly as `StableDiffusionXLPipeline.encode_prompt`
  builds them with clip_skip=None. Both tokenizers see the same sentence with the same length, so
  token position i is the same word in both; `input_ids` (tokenizer 1) index the attention maps.
- Added conditioning: `added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}` with
  time_ids = original_size + crops_coords_top_left + target_size, as the pipeline's
  `_get_add_time_ids` builds them. Images are squashed to S x S before the VAE, so original_size =
  target_size = (S, S) and crops_coords_top_left = (0, 0): the model is told it sees an uncropped
  S x S image, which is what it sees.
- UNet: DownBlock2D at the first level (stride 8, no attention), cross-attention at strides 16 and
  32 with transformer_layers_per_block [1, 2, 10], so 10 `attn2` layers at stride 16 (2x2 down +
  3x2 up) and 50 at stride 32 (2x10 + 3x10). Features s8 s16 s32; maps attn_s16 attn_s32.
- VAE scaling 0.13025; 1024 px.

Identity: SD's keys plus "family": "sdxl", the second tokenizer's digest and the UNet's SDXL-only
config (transformer_layers_per_block, addition embedding), so no SDXL cache can match an SD one.
"""

from __future__ import annotations

import torch

from refseg.backbones.families.base import TextConditioning
from refseg.backbones.families.unet import UNET_IDENTITY_KEYS, UNetFamily, tokenizer_sha256
from refseg.backbones.tiny import VAE_CONFIG
from refseg.backbones.tokenizer_vocab import build_tokenizer

# toy sizes of 768, 1280, 1280; the two widths differ as the real ones do (diffusers' single-file loader
# tells the encoders apart by width, and a concatenation in the wrong order would show)
TEXT_DIM_1, TEXT_DIM_2, PROJECTION_DIM = 32, 48, 48
TIME_EMBED_DIM = 8  # toy size of addition_time_embed_dim 256
TOKEN_LIMIT = 77

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),  # SDXL: 320, 640, 1280
    layers_per_block=2,
    attention_head_dim=(1, 2, 4),  # heads per level, as SDXL's [5, 10, 20]
    transformer_layers_per_block=(1, 2, 10),  # SDXL's, exactly
    cross_attention_dim=TEXT_DIM_1 + TEXT_DIM_2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,  # 6 time ids + pooled
    norm_num_groups=32,
)

TEXT_CONFIG_1 = dict(hidden_size=TEXT_DIM_1, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     max_position_embeddings=TOKEN_LIMIT, hidden_act="quick_gelu")  # CLIP-L
TEXT_CONFIG_2 = dict(hidden_size=TEXT_DIM_2, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     max_position_embeddings=TOKEN_LIMIT, hidden_act="gelu", projection_dim=PROJECTION_DIM)  # OpenCLIP-G

# SDXL's scheduler: SD's betas, epsilon
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, steps_offset=1, prediction_type="epsilon")
VAE_SCALING = 0.13025

SDXL_UNET_KEYS = ("transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim",
                  "projection_class_embeddings_input_dim", "use_linear_projection")


def time_ids(image_size: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B, 6): original_size + crops_coords_top_left + target_size = (S, S, 0, 0, S, S) (module doc)."""
    ids = torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


class SDXLFamily(UNetFamily):
    name = "sdxl"
    tiny_name = "tiny-sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    text_encoders = ("text_encoder", "text_encoder_2")
    default_strides = (8, 16, 32)
    default_attn_strides = (16, 32)
    unet_identity_keys = UNET_IDENTITY_KEYS + SDXL_UNET_KEYS

    def default_image_size(self, components: dict) -> int:
        return 1024

    def text_encoder_class(self, name: str):
        # deferred: diffusers and transformers are heavy and the family registry is imported without them
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel

    def index_extras(self) -> dict:
        return {"feature_extractor": [None, None], "force_zeros_for_empty_prompt": True,
                "image_encoder": [None, None]}

    def build_tiny(self, seed: int = 0) -> dict:
        # deferred: diffusers and transformers are heavy and the family registry is imported without them
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        tokenizer = build_tokenizer(model_max_length=TOKEN_LIMIT)
        tokenizer_2 = build_tokenizer(model_max_length=TOKEN_LIMIT)
        tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", as SD2's

        def text_config(tok, cfg):
            return CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **cfg)

        torch.manual_seed(seed)
        vae = AutoencoderKL(**dict(VAE_CONFIG, scaling_factor=VAE_SCALING))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config(tokenizer, TEXT_CONFIG_1))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, TEXT_CONFIG_2))
        for m in (vae, unet, text_encoder, text_encoder_2):
            m.eval()
        return dict(vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                    tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=DDPMScheduler(**SCHEDULER_CONFIG))

    def identity(self, components: dict) -> dict:
        identity = super().identity(components)
        identity["family"] = self.name
        identity["tokenizer_2_sha256"] = tokenizer_sha256(components["tokenizer_2"])
        identity["vae_scaling_factor"] = self.scaling_factor(components)
        return identity

    # ---- text ------------------------------------------------------------------------------------
    def tokenize(self, components: dict, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        tokens = super().tokenize(components, texts, token_length)
        tok2 = components["tokenizer_2"](list(texts), padding="max_length", max_length=token_length, truncation=True,
                                         return_tensors="pt")
        tokens["input_ids_2"] = tok2["input_ids"]
        return tokens

    def encode_text(self, components: dict, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        enc1, enc2 = components["text_encoder"], components["text_encoder_2"]
        out1 = enc1(tokens["input_ids"].to(enc1.device), output_hidden_states=True)
        out2 = enc2(tokens["input_ids_2"].to(enc2.device), output_hidden_states=True)
        embedding = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return TextConditioning(embedding, out2.text_embeds)

    def pooled_dim(self, components: dict) -> int | None:
        return int(components["text_encoder_2"].config.projection_dim)

    def added_cond_kwargs(self, components: dict, text: TextConditioning, latents: torch.Tensor) -> dict:
        image_size = latents.shape[-1] * self.vae_scale_factor(components)
        ids = time_ids(image_size, len(latents), text.embedding.dtype, latents.device)
        return {"text_embeds": text.pooled, "time_ids": ids}


FAMILY = SDXLFamily()
