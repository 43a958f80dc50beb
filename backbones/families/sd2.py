"""Family "sd2": Stable Diffusion 2.x (OpenCLIP-H text encoder, per-level head counts, linear
projections in the transformers, v-prediction at 768 px for 2.0/2.1, epsilon at 512 px for -base).

The code path is SD1.x's (sd.py): the same pipeline class (`StableDiffusionPipeline` in
model_index.json), UNet, VAE and `CLIPTextModel`. What differs is configuration, which diffusers
carries: the OpenCLIP-H encoder is shipped as a `CLIPTextModel` (1024-d, hidden_act gelu) with 23 of
its 24 layers, so its last_hidden_state (final layer norm applied) is OpenCLIP's penultimate layer,
which SD2 is conditioned on; the UNet's `attention_head_dim` is a per-level list of head counts;
`use_linear_projection`. A folder, file or hub id of SD2.x is recognised after loading (`is_sd2`).

Identity: as SD1.x's (no "family" key, so SD2.x stores keep their fingerprint); its unet_config (cross_attention_dim 1024, the head list) and scheduler
(prediction_type) already say it is SD2. Features do not depend on prediction_type (the UNet's
activations are the same network whichever target it was trained for); the fingerprint records it.
"""

from __future__ import annotations

from refseg.backbones.families.sd import SDFamily
from refseg.backbones.tiny import build_sd_parts
from refseg.backbones.tokenizer_vocab import build_tokenizer

TEXT_DIM = 48  # toy size of OpenCLIP-H's 1024
TOKEN_LIMIT = 77

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=(1, 2, 4, 4),  # heads per level, as SD2's [5, 10, 20, 20] (diffusers' legacy name)
    cross_attention_dim=TEXT_DIM,
    use_linear_projection=True,
    upcast_attention=True,  # SD2.1's
    norm_num_groups=32,
)

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=TOKEN_LIMIT,
    hidden_act="gelu",  # OpenCLIP's (SD1.x's CLIP-L uses quick_gelu)
    projection_dim=32,
)

# SD2.1's scheduler: SD's betas, v-prediction
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, steps_offset=1, prediction_type="v_prediction")


def is_sd2(components: dict) -> bool:
    """SD2.x: an OpenCLIP text encoder (hidden_act gelu; CLIP-L, SD1.x's, uses quick_gelu)."""
    return components["text_encoder"].config.hidden_act == "gelu"


class SD2Family(SDFamily):
    name = "sd2"
    tiny_name = "tiny-sd2"

    def detect(self, model_index: dict) -> bool:
        return False  # same pipeline class as SD1.x: told apart after loading (`is_sd2`)

    def build_tiny(self, seed: int = 0) -> dict:
        tokenizer = build_tokenizer(model_max_length=TOKEN_LIMIT)
        tokenizer.pad_token = "!"  # SD2's tokenizer pads with "!", not <|endoftext|>
        return build_sd_parts(seed, tokenizer, UNET_CONFIG, TEXT_CONFIG, SCHEDULER_CONFIG)


FAMILY = SD2Family()
