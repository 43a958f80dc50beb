"""The UNet families' shared machinery (SD1.x in sd.py, SD2.x in sd2.py, SDXL in sdxl.py).

`UNetFamily` is everything a `UNet2DConditionModel` + `AutoencoderKL` + CLIP family shares: loading
by diffusers subfolders, single-file checkpoints through the pipeline class's `from_single_file`,
saving a folder with model_index.json, the stride-named `FeatureSpec` (`s8..s64`, `attn_s16`, ...)
and `UNetCapture`. SD1.x is this with one CLIPTextModel whose last_hidden_state is the context.

diffusers and transformers are imported inside the methods that load, save or build models: the
family registry (and with it `refseg.backbones.config_only`, which plans before any weights load) is
imported without them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from refseg.backbones.capture import UNetCapture
from refseg.backbones.families.base import (Family, TextConditioning, first_line, jsonable, load_component,
                                            load_weights)
from refseg.core.errors import ModelError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.noise import alphas_cumprod

UNET_IDENTITY_KEYS = ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                      "down_block_types", "up_block_types", "in_channels")
SCHEDULER_IDENTITY_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type")


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of one tokenizer's vocabulary (token -> id, sorted)."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def checked_schedule(config: dict) -> dict:
    """A DDPM scheduler config whose noise schedule can be computed (refseg_core/noise.py), refused at load
    in one line when a setting has the wrong type (`"num_train_timesteps": "many"`), rather than when the
    first noise level is set. A schedule refseg does not run (another beta_schedule) is still said there."""
    try:
        alphas_cumprod(config)
    except ModelError:
        pass
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"its scheduler_config.json holds a value of the wrong type ({first_line(exc)[:200]})") from None
    return config


class UNetCaptureRun:
    """`Family.capture` for UNet families: `UNetCapture` run with a `NoiseInput` and `TextConditioning`."""

    def __init__(self, family: "UNetFamily", components: dict, spec: FeatureSpec, early_exit: bool | None = None):
        self.family, self.components = family, components
        self.inner = UNetCapture(components["unet"], spec, early_exit=early_exit)

    def __enter__(self) -> "UNetCaptureRun":
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)

    @property
    def layer_calls(self) -> dict[str, int]:
        return self.inner.layer_calls

    def run(self, latents: torch.Tensor, noise, text: TextConditioning, return_output: bool = False):
        steps = torch.full((len(latents),), int(noise.model_timestep), dtype=torch.long, device=latents.device)
        added = self.family.added_cond_kwargs(self.components, text, latents)
        return self.inner.run(latents, steps, text.embedding, return_unet_output=return_output, added_cond_kwargs=added)


class UNetFamily(Family):
    """What SD1.x, SD2.x and SDXL share (see the module doc). Subclasses: tiny model, text encoding."""

    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_encoders = ("text_encoder",)  # transformers modules, in identity/hash order
    pipeline_class = "StableDiffusionPipeline"
    unet_identity_keys = UNET_IDENTITY_KEYS

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        return (self.pipeline_class,)

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        # deferred: heavy (see the module doc)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTokenizer

        kw = dict(local_files_only=local_files_only)
        weights = dict(output_loading_info=True, **kw)  # checked by load_weights: none missing, none of other shapes
        parts = dict(
            unet=load_weights("unet", lambda: UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, **weights), source=source),
            vae=load_weights("vae", lambda: AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, **weights), source=source),
        )
        for name in self.text_encoders:
            parts[name] = load_weights(name, lambda: self.text_encoder_class(name).from_pretrained(
                source, subfolder=name, dtype=dtype, ignore_mismatched_sizes=True, **weights), source=source)
        for name in self.tokenizers:
            parts[name] = load_component(name, lambda: CLIPTokenizer.from_pretrained(source, subfolder=name, **kw))
        parts["scheduler_config"] = load_component("scheduler", lambda: checked_schedule(dict(
            DDPMScheduler.load_config(source, subfolder="scheduler", **kw))), source=source,
            config="scheduler_config.json")
        return parts

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizers' component names: one per text encoder ("tokenizer", "tokenizer_2", ...)."""
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoders)

    def text_encoder_class(self, name: str):
        # deferred: heavy (see the module doc)
        from transformers import CLIPTextModel

        return CLIPTextModel

    def load_single_file(self, path: str, model_config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
            if self.pipeline_class == "StableDiffusionPipeline" else {}
        return self._from_single_file(path, model_config, dtype, local_files_only, "unet", "a single-file checkpoint",
                                      **extra)

    def save(self, components: dict, folder) -> None:
        # deferred: heavy (see the module doc)
        import diffusers

        folder = Path(folder)
        for name in ("unet", "vae", *self.text_encoders, *self.tokenizers):
            components[name].save_pretrained(folder / name)
        for name in self.tokenizers:  # CLIP's own vocab.json + merges.txt too, for transformers 4.x's slow tokenizer
            components[name].backend_tokenizer.model.save(str(folder / name))
        if "scheduler" in components:
            components["scheduler"].save_pretrained(folder / "scheduler")
            scheduler_class = type(components["scheduler"]).__name__
        else:
            config = components["scheduler_config"]
            scheduler_class = config.get("_class_name", "DDPMScheduler")
            cfg = {k: v for k, v in config.items() if not k.startswith("_")}
            cfg = {"_class_name": scheduler_class, "_diffusers_version": diffusers.__version__, **cfg}
            (folder / "scheduler").mkdir(parents=True, exist_ok=True)
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        index = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
                 **self.index_extras(),
                 "scheduler": ["diffusers", scheduler_class],
                 "unet": ["diffusers", type(components["unet"]).__name__],
                 "vae": ["diffusers", type(components["vae"]).__name__]}
        for name in self.text_encoders:
            index[name] = ["transformers", type(components[name]).__name__]
        for name in self.tokenizers:
            index[name] = ["transformers", "CLIPTokenizer"]
        index = {k: index[k] for k in sorted(index, key=lambda k: (not k.startswith("_"), k))}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def index_extras(self) -> dict:
        return {"feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
                "safety_checker": [None, None]}

    def modules(self, components: dict) -> dict[str, torch.nn.Module]:
        return {k: components[k] for k in ("vae", "unet", *self.text_encoders)}

    def identity(self, components: dict) -> dict:
        unet, scheduler = components["unet"].config, components["scheduler_config"]
        identity = {"tokenizer_sha256": tokenizer_sha256(components["tokenizer"]),
                    "unet_config": {k: jsonable(unet.get(k)) for k in self.unet_identity_keys},
                    "scheduler": {k: jsonable(scheduler.get(k)) for k in SCHEDULER_IDENTITY_KEYS}}
        return identity

    def max_stride(self, components: dict) -> int:
        return self.vae_scale_factor(components) * 2 ** (len(components["unet"].config.block_out_channels) - 1)

    # ---- text ------------------------------------------------------------------------------------
    def tokenize(self, components: dict, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        tok = components["tokenizer"](list(texts), padding="max_length", max_length=token_length, truncation=True,
                                      return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def encode_text(self, components: dict, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        """SD1.x/2.x: the text encoder's last_hidden_state (final layer norm applied). For SD2.x that is
        OpenCLIP-H's penultimate layer: diffusers' conversion keeps 23 of its 24 layers."""
        device = components["text_encoder"].device
        return TextConditioning(components["text_encoder"](tokens["input_ids"].to(device))[0])

    def text_shape(self, components: dict, token_length: int) -> tuple[int, int]:
        return token_length, int(components["unet"].config.cross_attention_dim)

    # ---- features --------------------------------------------------------------------------------
    def spec(self, components: dict, image_size: int, token_length: int, strides=None, attn_strides=None,
             **choices) -> FeatureSpec:
        if choices:
            raise ModelError(f"family {self.name} takes strides and attn_strides, not {', '.join(sorted(choices))}")
        limit = self.max_token_length(components)
        if token_length > limit:
            raise ModelError(f"--token-length {token_length} exceeds the text encoder's {limit} positions")
        strides = self.default_strides if strides is None else strides
        attn_strides = self.default_attn_strides if attn_strides is None else attn_strides
        try:
            return FeatureSpec.from_unet_config(dict(components["unet"].config), image_size, token_length,
                                                self.vae_scale_factor(components), strides, attn_strides)
        except ValueError as exc:
            raise ModelError(str(exc)) from None

    def capture(self, components: dict, spec: FeatureSpec, early_exit: bool | None = None) -> UNetCaptureRun:
        return UNetCaptureRun(self, components, spec, early_exit)

    def added_cond_kwargs(self, components: dict, text: TextConditioning, latents: torch.Tensor) -> dict | None:
        """The UNet's `added_cond_kwargs` (SDXL: pooled text + time_ids); None for SD1.x/2.x."""
        return None
