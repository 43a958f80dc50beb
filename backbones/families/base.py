"""The family seam: what every backbone family (SD1.x, SD2.x, SDXL, SD3, FLUX) provides to extraction.

A family is one module in this package with one `Family` instance, registered in `FAMILIES`
(`backbones/families/__init__.py`). Everything that differs between backbones sits behind it:
building the tiny random model, loading (folder, hub id, single file), tokenizing, encoding text,
the `FeatureSpec` of what is stored, and capturing it from one denoiser forward. Extraction
(extract/pipeline.py) only calls these; it never asks which family it runs.

Components are a plain dict (`{"vae", "unet" | "transformer", "text_encoder", "tokenizer",
"scheduler_config", ...}`: diffusers' own subfolder names), so a folder saved by `save` loads with
diffusers' pipeline class too.

Noise (refseg_core/noise.py): `noise_input` turns `--noise-t T` / `--noise-sigma σ` into a
`NoiseInput` (ᾱ or σ, SNR, the exact model timestep); `noise_latents` applies it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from refseg.core.errors import ModelError
from refseg.core.feature_spec import DEFAULT_ATTN_STRIDES, DEFAULT_STRIDES, FeatureSpec
from refseg.core.noise import DDPM, NoiseInput, noise_input

__all__ = ["Family", "NoiseInput", "TextConditioning", "read_model_index"]


@dataclass
class TextConditioning:
    """What the denoiser is conditioned on for a batch of sentences.

    `embedding`: (B, L, D), the denoiser's text context (UNets: `encoder_hidden_states`).
    `pooled`: (B, P) or None: SDXL: CLIP-G's `text_embeds`; SD3: CLIP-L+G pooled, concatenated;
    FLUX: CLIP-L's pooled output. Stored per sentence as `text/pooled` only for families with one.
    """

    embedding: torch.Tensor
    pooled: torch.Tensor | None = None


def jsonable(v):
    """A config value as JSON keeps it in the identity: tuples as lists."""
    return list(v) if isinstance(v, tuple) else v


def first_line(exc: BaseException) -> str:
    """The first line of what `exc` says (its class name when it says nothing)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_model_index(folder: str) -> dict | None:
    """A diffusers folder's model_index.json, or None when it has none (or it is not JSON)."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def load_component(name: str, load, *, source: str | None = None, config: str = "config.json"):
    """`load()` (one component's from_pretrained); whatever it raises on a malformed folder (diffusers and
    transformers raise TypeError, ValueError, KeyError, RuntimeError, validation errors ...) becomes a
    ModelError naming the component's subfolder and the first line that says what is wrong.

    `source`: the model's folder (or hub id), whose `name/config` is first checked to be a JSON object
    when it is a local file (the loaders misread a JSON list as a path to download)."""
    if source is not None:
        check_config_file(source, name, config)
    try:
        return load()
    except OSError as exc:  # still an OSError: the hub path reads it as "not found" (backbones/loading.py)
        raise ComponentNotReadable(f"its {name}/ cannot be loaded: {describe_load_error(exc, config)}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party loader on the user's files
        raise ModelError(f"its {name}/ cannot be loaded: {describe_load_error(exc, config)}") from None


def load_weights(name: str, load, *, source: str | None = None):
    """`load_component` for a module whose `load()` returns (module, loading info), as diffusers' and
    transformers' `from_pretrained(..., output_loading_info=True)` do. Weights that the config describes
    but the files lack are refused, not left uninitialised (diffusers) or random (transformers); so are
    weights of other shapes (transformers reports them only with `ignore_mismatched_sizes=True`)."""
    module, info = load_component(name, load, source=source)
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])  # transformers' order varies
    if mismatched:
        key, found, expected = mismatched[0][:3]
        raise ModelError(f"its {name}/ cannot be loaded: {shape_mismatch(key, found, expected, len(mismatched))}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"its {name}/ cannot be loaded: its weights lack {len(missing)} tensor(s) that its "
                         f"config.json describes ({shown}): the config and the weights are of different models")
    return module


def check_config_file(source: str, name: str, config: str = "config.json") -> None:
    """Refuse a local `source/name/config` that is not valid JSON or not a JSON object (one line)."""
    path = os.path.join(source, name, config)
    if not os.path.isfile(path):
        return  # a hub id, or a file that is missing: the loader says so
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"its {name}/ cannot be loaded: {name}/{config} is not a valid JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"its {name}/ cannot be loaded: {name}/{config} holds a JSON {type(value).__name__}, "
                         "not the object of settings a config is")


class ComponentNotReadable(ModelError, OSError):
    """A component's files are missing or unreadable (an OSError from the loader)."""


# torch's load_state_dict line for one weight of another shape (diffusers raises it as it is)
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def shape_mismatch(key: str, found, expected, count: int) -> str:
    """The clause naming the first weight of another shape: what the config expects, what the file holds."""
    more = f" ({count} tensors differ)" if count > 1 else ""
    return (f"its weights do not fit its config.json: {key} is {_shape(found)} in the weights but the config "
            f"makes it {_shape(expected)}{more}; the config and the weights are of different models")


def _shape(shape) -> str:
    return str(list(shape)) if not isinstance(shape, str) else shape


def describe_load_error(exc: BaseException, config: str = "config.json") -> str:
    """One line of `exc`: for torch's "Error(s) in loading state_dict for X:" the first weight it names
    (a size mismatch, a missing or unexpected key), not the empty first line."""
    text = str(exc)
    sizes = _SIZE_MISMATCH.findall(text)
    if sizes:
        key, found, expected = sizes[0]
        return shape_mismatch(key, found, expected, len(sizes))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        detail = lines[1]
        return f"{lines[0]} {detail[:400]}{'...' if len(detail) > 400 else ''}"
    if isinstance(exc, TypeError) or type(exc).__name__.endswith("ValidationError"):
        return f"its {config} holds a value of the wrong type ({' '.join(lines)[:300]})"
    return lines[0][:300]


class Family:
    """One backbone family. Subclasses set the class attributes and implement the methods that raise.

    Components are a dict of diffusers/transformers objects (see the module doc); every method takes
    it first, so one `Family` instance serves every loaded model of the family.
    """

    name: str  # "sd", "sd2", "sdxl", "sd3", "flux": recorded in the backbone identity (except "sd": see sd.py)
    noise_kind: str = DDPM  # "ddpm" | "flow"
    tiny_name: str  # --model value of the tiny random model: "tiny", "tiny-sd2", ...
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this family loads
    components: tuple[str, ...] = ()  # the diffusers subfolders a folder of this family must have
    denoiser_name: str = "unet"  # the components key of the denoiser: "unet" | "transformer"
    text_encoders: Iterable[str]  # the text encoders' component names, in identity order
    tokenizers: Iterable[str]  # the tokenizers' component names, in identity order
    default_strides: tuple[int, ...] = DEFAULT_STRIDES
    default_attn_strides: tuple[int, ...] = DEFAULT_ATTN_STRIDES
    flow_timestep_scale: float = 1000.0  # flow families: model timestep = σ x this (SD3 1000, FLUX 1)

    # ---- building and loading ---------------------------------------------------------------------
    def build_tiny(self, seed: int = 0) -> dict:
        """The components of the tiny random model (deterministic from `seed`, fp32, CPU, eval), with a
        `scheduler` object or a `scheduler_config` dict."""
        raise NotImplementedError

    def detect(self, model_index: dict) -> bool:
        """Whether a diffusers folder with this model_index.json belongs to this family."""
        return model_index.get("_class_name") in self.pipeline_classes

    def load(self, source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        """The components from a diffusers folder or hub id (diffusers' from_pretrained per subfolder)."""
        raise NotImplementedError

    def load_single_file(self, path: str, model_config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
        """The components from one original-layout checkpoint file (`--model-config DIR` offline)."""
        raise ModelError(f"cannot load {path!r}: single-file checkpoints are not supported for family {self.name}; "
                         "use a diffusers folder or hub id")

    def _from_single_file(self, path: str, model_config: str | None, dtype: torch.dtype, local_files_only: bool,
                          denoiser: str, what: str, **extra) -> dict:
        """`load_single_file` through the pipeline class's `from_single_file`: the denoiser (`denoiser`),
        VAE, text encoders and tokenizers, and the scheduler's config; one ModelError naming `what` the
        file was read as when diffusers cannot load it."""
        import diffusers  # deferred: heavy, and a family module is imported without it

        pipeline = getattr(diffusers, self.pipeline_class)
        try:
            pipe = pipeline.from_single_file(path, config=model_config, local_files_only=local_files_only,
                                             torch_dtype=dtype, **extra)
        except Exception as exc:  # diffusers raises anything from OSError to KeyError on a bad file
            hint = "" if model_config else (" (without --model-config the component configs come from the Hugging "
                                            "Face hub or its local cache; offline, pass --model-config DIR)")
            raise ModelError(f"cannot load model {path!r} as {what}: {first_line(exc)}{hint}") from None
        parts = {name: getattr(pipe, name) for name in (denoiser, "vae", *self.text_encoders, *self.tokenizers)}
        parts["scheduler_config"] = dict(pipe.scheduler.config)
        return parts

    def save(self, components: dict, folder) -> None:
        """Write the components as a diffusers folder with model_index.json (loads back with `load`)."""
        raise NotImplementedError

    def modules(self, components: dict) -> dict[str, torch.nn.Module]:
        """The weighted modules (hashed into the identity, moved to the device, frozen)."""
        return {k: components[k] for k in components if isinstance(components[k], torch.nn.Module)}

    def identity(self, components: dict) -> dict:
        """What the backbone identity records of this family beyond model/kind/weights (configs)."""
        raise NotImplementedError

    def denoiser(self, components: dict) -> torch.nn.Module:
        return components[self.denoiser_name]

    # ---- latents ----------------------------------------------------------------------------------
    def scaling_factor(self, components: dict) -> float:
        return float(components["vae"].config.scaling_factor)

    def shift_factor(self, components: dict) -> float | None:
        """The VAE's shift (SD3/FLUX: z = (x - shift) * scale); None when it has none."""
        value = components["vae"].config.get("shift_factor")
        return None if value is None else float(value)

    def latent_channels(self, components: dict) -> int:
        return int(components["vae"].config.latent_channels)

    def vae_scale_factor(self, components: dict) -> int:
        return 2 ** (len(components["vae"].config.block_out_channels) - 1)

    def max_stride(self, components: dict) -> int:
        """The side of an image must be a multiple of this (pixels)."""
        raise NotImplementedError

    def default_image_size(self, components: dict) -> int:
        """The side the model was trained at (pixels): `--image-size` when it is not given."""
        return 512

    # ---- text -------------------------------------------------------------------------------------
    def max_token_length(self, components: dict) -> int:
        """The most tokens `--token-length` may ask for (the first tokenizer's: they index the maps)."""
        return int(components["text_encoder"].config.max_position_embeddings)

    def map_tokenizer(self, components: dict):
        """The tokenizer whose ids are `tokenize`'s `input_ids` (they index the maps): what the report's
        count of sentences truncated to --token-length counts with."""
        return components["tokenizer"]

    def tokenize(self, components: dict, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        """`input_ids` (B, L): the ids whose positions index the attention maps' token axis (stored as
        text/input_ids), `attention_mask` (B, L), plus what else `encode_text` needs (input_ids_2, t5_ids...)."""
        raise NotImplementedError

    def encode_text(self, components: dict, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        raise NotImplementedError

    def text_shape(self, components: dict, token_length: int) -> tuple[int, int]:
        """(context length, width) of `TextConditioning.embedding` (the stored text/embedding per sentence)."""
        raise NotImplementedError

    def pooled_dim(self, components: dict) -> int | None:
        """Width of `TextConditioning.pooled`; None for families without one (no text/pooled stored)."""
        return None

    # ---- features ---------------------------------------------------------------------------------
    def spec(self, components: dict, image_size: int, token_length: int, **choices) -> FeatureSpec:
        """What extraction stores at `image_size` with `token_length` tokens. `choices`: the family's
        layer choices (UNets: strides, attn_strides)."""
        raise NotImplementedError

    def capture(self, components: dict, spec: FeatureSpec):
        """A context manager whose `.run(latents, noise: NoiseInput, text: TextConditioning,
        return_output=False)` returns {name: float32 (B, C, h, w)} for every tensor of `spec` (with the
        denoiser's output too when `return_output`), the denoiser restored on exit."""
        raise NotImplementedError

    # ---- noise ------------------------------------------------------------------------------------
    def noise_input(self, components: dict, t: int | None = None, sigma: float | None = None,
                    timestep: int | None = None) -> NoiseInput:
        """`--noise-t t` / `--noise-sigma sigma` (with `--timestep`) as this family's model runs it."""
        return noise_input(components.get("scheduler_config"), kind=self.noise_kind, t=t, sigma=sigma,
                           timestep=timestep, timestep_scale=self.flow_timestep_scale)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
