"""Family "sd": Stable Diffusion 1.x, a `UNetFamily` (unet.py) with one CLIPTextModel whose
last_hidden_state is the context.

Identity: the keys model, kind, weights_sha256, tokenizer_sha256, unet_config and scheduler, with no
"family" key, so every SD1.x and SD2.x store keeps its fingerprint; the other families add a
"family" key (sdxl.py).
"""

from __future__ import annotations

from refseg.backbones.families.unet import UNetFamily
from refseg.backbones.tiny import build_tiny


class SDFamily(UNetFamily):
    """SD1.x (and SD2.x checkpoints loaded from a folder, file or hub id: the same pipeline class, the
    same code; `tiny-sd2` and the SD2 defaults are sd2.py's)."""

    name = "sd"
    tiny_name = "tiny"

    def build_tiny(self, seed: int = 0) -> dict:
        return build_tiny(seed)

    def detect(self, model_index: dict) -> bool:
        return model_index.get("_class_name") in ("StableDiffusionPipeline",)

    def default_image_size(self, components: dict) -> int:
        """512; 768 for a v-prediction SD2.x (stable-diffusion-2(-1) is trained at 768, its -base at 512)."""
        v = components["scheduler_config"].get("prediction_type") == "v_prediction"
        return 768 if v else 512


FAMILY = SDFamily()
