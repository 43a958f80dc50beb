"""What the joint-attention families (SD3 in sd3.py, FLUX in flux.py) share: `TransformerFamily`.

A transformer denoiser on 16-channel latents (VAE x8 with `shift_factor`: z = (x - shift) x scale),
flow matching (model timestep from `NoiseInput`), several text encoders loaded by diffusers'
subfolder names, the block-named `FeatureSpec` (`j12_s16`, `attn_j12_s16`;
`FeatureSpec.from_transformer`) and `JointCapture` (backbones/joint_capture.py: text-token maps
renormalised over the text keys, without the full map). Subclasses give the tiny model, the text
conditioning and the forward call.

diffusers and transformers are imported inside the methods that load, save or build models: the
family registry (and with it `refseg.backbones.config_only`, which plans before any weights load) is
imported without them.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import torch

from refseg.backbones.families.base import (Family, TextConditioning, jsonable, load_component,
                                            load_weights)
from refseg.backbones.joint_capture import DEFAULT_CHUNK, JointCapture
from refseg.core.errors import ModelError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.noise import FLOW

T5_TOKEN_LIMIT = 512  # the pipelines' largest max_sequence_length (T5's relative positions have no hard limit)
CLIP_TOKENS = 77
TRANSFORMER_IDENTITY_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                             "joint_attention_dim", "pooled_projection_dim", "in_channels", "patch_size",
                             "dual_attention_layers", "qk_norm", "guidance_embeds", "axes_dims_rope")
SCHEDULER_IDENTITY_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting")

# the tiny models' T5 encoder (gated-GELU, as T5-XXL v1.1); flux.py gives its own d_model
TINY_T5_CONFIG = dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def build_clip(config: dict, tokenizer, cls_name: str):
    """A random CLIP text encoder of class `cls_name` sized to `tokenizer` (the tiny models)."""
    import transformers  # deferred: heavy, and the family registry is imported without it

    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config))


def build_t5(tokenizer, **overrides):
    """A random T5 encoder (`TINY_T5_CONFIG` with `overrides`) sized to `tokenizer` (the tiny models)."""
    # deferred: heavy (see the module doc)
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
                                   **{**TINY_T5_CONFIG, **overrides}))


def scheduler_config(**config) -> dict:
    """A FlowMatchEulerDiscreteScheduler config as `load_config` returns it (with its class name)."""
    # deferred: heavy (see the module doc)
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in FlowMatchEulerDiscreteScheduler(**config).config.items() if not k.startswith("_")}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", **cfg}


def tokenizers_sha256(components: dict, names) -> str:
    """sha256 of the named tokenizers' vocabularies (token -> id, sorted), in `names`' order."""
    vocab = [sorted(components[n].get_vocab().items()) for n in names]
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def pad_tokens(tokenizer, texts, length: int) -> dict[str, torch.Tensor]:
    """`texts` tokenized to exactly `length` ids each (padded or truncated)."""
    return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")


class TransformerFamily(Family):
    """What SD3 and FLUX share (see the module doc). Subclasses: tiny model, text, the forward call."""

    noise_kind = FLOW
    denoiser_name = "transformer"
    default_strides = (16,)
    default_attn_strides = (16,)
    pipeline_class: str
    transformer_class: str
    text_encoders: dict[str, str]  # component name -> transformers class
    tokenizers: dict[str, str]  # component name -> "clip" | "t5"

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        return (self.pipeline_class,)

    @property
    def components(self) -> tuple[str, ...]:
        return ("transformer", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    # ---- loading and saving ----------------------------------------------------------------------
    def load(self, source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        # deferred: heavy (see the module doc)
        import diffusers
        import transformers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        kw = dict(local_files_only=local_files_only)
        weights = dict(output_loading_info=True, **kw)  # checked by load_weights: none missing, none of other shapes
        parts = dict(
            transformer=load_weights("transformer", lambda: getattr(diffusers, self.transformer_class).from_pretrained(
                source, subfolder="transformer", torch_dtype=dtype, **weights), source=source),
            vae=load_weights("vae", lambda: AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, **weights), source=source),
        )
        for name, cls in self.text_encoders.items():
            parts[name] = load_weights(name, lambda: getattr(transformers, cls).from_pretrained(
                source, subfolder=name, dtype=dtype, ignore_mismatched_sizes=True, **weights), source=source)
        for name, kind in self.tokenizers.items():
            cls = transformers.CLIPTokenizer if kind == "clip" else transformers.T5TokenizerFast
            parts[name] = load_component(name, lambda: cls.from_pretrained(source, subfolder=name, **kw))
        scheduler = load_component("scheduler", lambda: FlowMatchEulerDiscreteScheduler.load_config(
            source, subfolder="scheduler", **kw), source=source, config="scheduler_config.json")
        parts["scheduler_config"] = dict(scheduler)
        return parts

    def load_single_file(self, path: str, model_config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
        """The pipeline class's `from_single_file`: a whole original checkpoint, or the transformer alone
        (FLUX's flux1-dev.safetensors) with the other components from `--model-config`."""
        return self._from_single_file(path, model_config, dtype, local_files_only, "transformer",
                                      f"a single-file {self.name} checkpoint")

    def save(self, components: dict, folder) -> None:
        # deferred: heavy (see the module doc)
        import diffusers

        folder = Path(folder)
        for name in ("transformer", "vae", *self.text_encoders, *self.tokenizers):
            components[name].save_pretrained(folder / name)
        config = components["scheduler_config"]
        cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": diffusers.__version__,
               **{k: v for k, v in config.items() if not k.startswith("_")}}
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        index = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "transformer": ["diffusers", type(components["transformer"]).__name__],
                 "vae": ["diffusers", type(components["vae"]).__name__]}
        index.update({name: ["transformers", cls] for name, cls in self.text_encoders.items()})
        index.update({name: ["transformers", "CLIPTokenizer" if kind == "clip" else "T5TokenizerFast"]
                      for name, kind in self.tokenizers.items()})
        index.update(self.index_extras())
        index = {k: index[k] for k in sorted(index, key=lambda k: (not k.startswith("_"), k))}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def index_extras(self) -> dict:
        return {}

    def modules(self, components: dict) -> dict[str, torch.nn.Module]:
        return {k: components[k] for k in ("vae", "transformer", *self.text_encoders)}

    def identity(self, components: dict) -> dict:
        transformer, scheduler = components["transformer"].config, components["scheduler_config"]
        return {"family": self.name,
                "tokenizer_sha256": tokenizers_sha256(components, self.tokenizers),
                "transformer_config": {k: jsonable(transformer.get(k)) for k in TRANSFORMER_IDENTITY_KEYS
                                       if k in transformer},
                "scheduler": {k: jsonable(scheduler.get(k)) for k in SCHEDULER_IDENTITY_KEYS},
                **self.identity_extras(components)}

    def identity_extras(self, components: dict) -> dict:
        return {}

    def max_stride(self, components: dict) -> int:
        """One token = 2x2 latent pixels (SD3's patch, FLUX's packing)."""
        return self.vae_scale_factor(components) * 2

    def default_image_size(self, components: dict) -> int:
        return 1024

    # ---- text ------------------------------------------------------------------------------------
    def max_token_length(self, components: dict) -> int:
        """`--token-length` counts T5 tokens (the pipelines' max_sequence_length)."""
        return T5_TOKEN_LIMIT

    def text_length(self, components: dict, token_length: int) -> int:
        """Length of the text sequence the joint attention sees (the maps' token axis)."""
        return token_length

    def text_shape(self, components: dict, token_length: int) -> tuple[int, int]:
        """`token_length` is the spec's: the text sequence length (extraction passes `spec.token_length`),
        which for SD3 already counts CLIP's 77 positions."""
        return token_length, int(components["transformer"].config.joint_attention_dim)

    def pooled_dim(self, components: dict) -> int:
        return int(components["transformer"].config.pooled_projection_dim)

    # ---- features --------------------------------------------------------------------------------
    def spec(self, components: dict, image_size: int, token_length: int, blocks=None, attn_blocks=None,
             strides=None, attn_strides=None, **choices) -> FeatureSpec:
        """`blocks`/`attn_blocks`: block ids (default: `TransformerBlocks.default`). Everything is at stride
        16, so `strides`/`attn_strides` (the UNet options) only switch features/maps on (16) or off (empty);
        any other stride is refused, as a UNet refuses a stride it does not have."""
        if choices:
            raise ModelError(f"family {self.name} takes blocks, attn_blocks, strides, attn_strides, "
                             f"not {', '.join(sorted(choices))}")
        if token_length > self.max_token_length(components):
            raise ModelError(f"--token-length {token_length} exceeds the {self.max_token_length(components)} T5 "
                             f"tokens family {self.name} allows")
        stride = self.max_stride(components)
        for flag, given in (("--strides", strides), ("--attn-strides", attn_strides)):
            if given is not None and set(given) - {stride}:
                raise ModelError(f"{flag} {','.join(map(str, given))}: every feature of a {self.name} transformer "
                                 f"is at stride {stride}")
        if strides is not None and stride not in strides:
            blocks = ()
        if attn_strides is not None and stride not in attn_strides:
            attn_blocks = ()
        try:
            return FeatureSpec.from_transformer(dict(components["transformer"].config), image_size,
                                                self.text_length(components, token_length), blocks, attn_blocks,
                                                self.vae_scale_factor(components))
        except ValueError as exc:
            raise ModelError(str(exc)) from None

    def capture(self, components: dict, spec: FeatureSpec, early_exit: bool | None = None, chunk: int | None = None):
        return JointCapture(components["transformer"], spec, partial(self.forward, components), early_exit,
                            chunk or DEFAULT_CHUNK)

    def forward(self, components: dict, latents: torch.Tensor, noise, text: TextConditioning) -> torch.Tensor:
        """The transformer on `latents` (B, 16, h, w) as the family's pipeline calls it -> velocity (B, 16, h, w)."""
        raise NotImplementedError
