"""Loading the frozen backbone (VAE, denoiser, text encoders, tokenizers, noise schedule) of any family.

`--model` accepts a Hugging Face hub id, a local diffusers folder, a single `.safetensors`/`.ckpt`
file (with `--model-config DIR` offline), `tiny` (random, built in code), `tiny-synth` (trained,
shipped as a diffusers folder) or another family's tiny random model (`tiny-sd2`, `tiny-sdxl`, ...).
Which family a model is comes from its model_index.json (backbones/families/); the family loads,
names and runs its parts, this module only finds them and records their identity. Nothing downloads implicitly: only a hub id that is not a local
path reaches the network, never with HF_HUB_OFFLINE=1, and only when it is not in the local
Hugging Face cache already and a quick connection to the hub opens (else it fails at once, saying
so, instead of retrying for half a minute); whatever cannot be found is a `ModelError` listing
these forms.

Imported by `extract` and `study`, never by `refseg.core` or `heads`; diffusers and transformers are
imported only when a model is loaded or saved, so planning (`config_only`) can import this module first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from refseg.core.device import resolve_device
from refseg.core.errors import ModelError
from refseg.backbones.families import FAMILIES, Family, TextConditioning, family_for_index, read_model_index, tiny_names
from refseg.backbones.families.base import first_line
from refseg.backbones.families.sd2 import is_sd2
from refseg.backbones.text_adapter import adapter_identity, load_text_adapter
from refseg.core.feature_spec import FeatureSpec
from refseg.core.noise import FLOW, SD_SCHEDULE, NoiseInput

ACCEPTED_FORMS = (
    "--model accepts: a Hugging Face hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
    "a local diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), "
    "a single .safetensors/.ckpt file (with --model-config DIR offline), 'tiny' or 'tiny-synth', "
    "or a family's tiny random model ('tiny-sd2', 'tiny-sdxl', ...)"
)
TINY_SYNTH_DIR = Path(__file__).parent / "assets" / "tiny-synth"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PROBE_SECONDS = 5.0  # how long a connection to the hub may take to open before it counts as unreachable
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class Backbone:
    """The frozen parts extraction runs; `identity` goes into the cache fingerprint.

    Everything family-specific goes through `family` (backbones/families/) with `components`: all of
    the model's parts by diffusers' names, and its `scheduler_config`. `vae`, `unet` (None for a
    transformer family: see `denoiser`), `text_encoder` and `tokenizer` are the first of each.
    """

    family: Family
    components: dict
    identity: dict
    device: torch.device
    dtype: torch.dtype
    # VPD's text adapter (backbones/text_adapter.py), from a folder's text_adapter/; None: CLIP's output as is
    text_adapter: torch.nn.Module | None = None

    @property
    def vae(self) -> torch.nn.Module:
        return self.components["vae"]

    @property
    def unet(self) -> torch.nn.Module | None:
        return self.components.get("unet")

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.components["text_encoder"]

    @property
    def tokenizer(self):
        return self.components["tokenizer"]

    @property
    def scheduler_config(self) -> dict:
        return self.components["scheduler_config"]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet, or the transformer of a DiT family."""
        return self.family.denoiser(self.components)

    # ---- text -------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], token_length: int) -> dict[str, torch.Tensor]:
        return self.family.tokenize(self.components, texts, token_length)

    def encode(self, tokens: dict[str, torch.Tensor]) -> TextConditioning:
        """What the denoiser is conditioned on, through the text adapter if any (SD families)."""
        text = self.family.encode_text(self.components, tokens)
        if self.text_adapter is not None:
            text = TextConditioning(self.text_adapter(text.embedding), text.pooled)
        return text

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text context of `input_ids` alone (one-tokenizer families: SD1.x/2.x)."""
        return self.encode({"input_ids": input_ids}).embedding

    def text_shape(self, token_length: int) -> tuple[int, int]:
        return self.family.text_shape(self.components, token_length)

    @property
    def pooled_dim(self) -> int | None:
        return self.family.pooled_dim(self.components)

    # ---- latents and noise ------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.components)

    @property
    def scaling_factor(self) -> float:
        return self.family.scaling_factor(self.components)

    @property
    def shift_factor(self) -> float | None:
        return self.family.shift_factor(self.components)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.components)

    def noise_input(self, t: int | None = None, sigma: float | None = None, timestep: int | None = None) -> NoiseInput:
        return self.family.noise_input(self.components, t=t, sigma=sigma, timestep=timestep)

    @property
    def max_token_length(self) -> int:
        return self.family.max_token_length(self.components)

    @property
    def max_stride(self) -> int:
        """The coarsest feature stride (pixels): an image side must be a multiple of this (64 for SD1.x)."""
        return self.family.max_stride(self.components)

    @property
    def schedule_steps(self) -> int:
        """Steps of the noise schedule --noise-t counts in (1000 for Stable Diffusion; flow models: SD's scale)."""
        if self.family.noise_kind == FLOW:
            return int(SD_SCHEDULE["num_train_timesteps"])
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def default_image_size(self) -> int:
        """The family's training resolution (SD1.x 512, SD2.x-v 768, SDXL 1024, ...)."""
        return self.family.default_image_size(self.components)

    # ---- features ---------------------------------------------------------------------------------
    def spec(self, image_size: int = 512, token_length: int = 40, strides=None, attn_strides=None,
             **choices) -> FeatureSpec:
        """What extraction stores for this backbone at `image_size` with `token_length` tokens (strides:
        the family's defaults when None)."""
        if strides is not None:
            choices["strides"] = strides
        if attn_strides is not None:
            choices["attn_strides"] = attn_strides
        return self.family.spec(self.components, image_size, token_length, **choices)

    def capture(self, spec: FeatureSpec):
        """The family's capture context (`.run(latents, noise, text, return_output=False)`)."""
        return self.family.capture(self.components, spec)


# ---- loading ------------------------------------------------------------------------------------
def load_backbone(model: str, *, model_config: str | None = None, device="auto", dtype="auto") -> Backbone:
    """Load `model` (see the module doc for the accepted forms), frozen, on `device` in `dtype`."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _quiet():
        return _load(str(model), model_config, device, dtype)


def _load(model: str, model_config: str | None, device: torch.device, dtype: torch.dtype) -> Backbone:
    tiny = tiny_names()
    if model in tiny:
        family = tiny[model]
        parts, kind, name = family.build_tiny(), "tiny", model
        if "scheduler" in parts:  # a scheduler object, or its config already (either is allowed)
            parts["scheduler_config"] = dict(parts.pop("scheduler").config)
    elif model == "tiny-synth":
        if not (TINY_SYNTH_DIR / "unet").is_dir():
            raise ModelError(f"cannot load model 'tiny-synth': it is not built in this installation "
                             f"({TINY_SYNTH_DIR} is missing); use --model tiny")
        # kind 'tiny-synth': the fingerprint hashes it as 'folder' (cache/fingerprint.py, FORMER_KIND)
        (family, parts), kind, name = _load_folder(str(TINY_SYNTH_DIR), dtype), "tiny-synth", "tiny-synth"
    elif os.path.isdir(model):
        (family, parts), kind, name = _load_folder(model, dtype), "folder", os.path.abspath(model)
    elif os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt")):
            raise ModelError(f"cannot load model {model!r}: a single-file checkpoint must end in .safetensors "
                             f"or .ckpt. {ACCEPTED_FORMS}")
        (family, parts), kind, name = _load_single_file(model, model_config, dtype), "file", os.path.abspath(model)
    elif _HUB_ID.match(model):
        (family, parts), kind, name = _load_hub(model, dtype), "hub", model
    else:
        raise ModelError(f"cannot load model {model!r}: not found. {ACCEPTED_FORMS}")
    family = _refine(family, parts)

    modules = family.modules(parts)
    for m in modules.values():
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    identity = {"model": name, "kind": kind, "weights_sha256": weights_sha256(modules), **family.identity(parts)}
    if kind == "file":
        identity["model_config"] = os.path.abspath(model_config) if model_config else None
    adapter = _text_adapter(model, kind, device, dtype)
    if adapter is not None:  # only then: caches of backbones without one keep their fingerprint
        identity["text_adapter"] = adapter_identity(adapter)
    return Backbone(family, parts, identity, device, dtype, adapter)


def _refine(family: Family, parts: dict) -> Family:
    """SD2.x shares SD1.x's pipeline class: told apart by its text encoder once loaded."""
    if family.name == "sd" and is_sd2(parts):
        return FAMILIES["sd2"]
    return family


def _text_adapter(model: str, kind: str, device: torch.device, dtype: torch.dtype):
    """A local folder's `text_adapter/` (written by `refseg-import vpd`), frozen like the rest; else None."""
    if kind != "folder" or not os.path.isdir(model):
        return None
    adapter = load_text_adapter(model)
    if adapter is not None:
        adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return adapter


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' = fp32 on CPU, bf16 on GPU; or fp32/fp16/bf16 (also float32, float16, bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown --dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    return _DTYPES[dtype]


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when it is imported.
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers while loading: their progress bars and advice (install
    accelerate, torchvision...) are noise in a tool whose output is its own progress bar."""
    # deferred: heavy, and config_only and the plan import this module without loading a model
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    for log in (dlog, tlog):
        # critical only: what fails raises (and is said in one line); their error logs would add a second line
        # ("An error occurred while trying to fetch ..." before the weights file that is missing)
        log.set_verbosity(logging.CRITICAL)
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _folder_family(path: str) -> Family:
    """The family a diffusers folder's model_index.json names; a folder without one is SD1.x's layout."""
    index = read_model_index(path)
    if index is None:
        if os.path.isfile(os.path.join(path, "model_index.json")):  # there but unreadable: the family is unknown
            raise ModelError(f"cannot load model {path!r}: its model_index.json is not a JSON object naming the "
                             "pipeline (invalid JSON, or another value): restore it from the model's source")
        return FAMILIES["sd"]
    family = family_for_index(index)
    if family is None:
        raise ModelError(f"cannot load model {path!r}: its model_index.json names pipeline "
                         f"{index.get('_class_name')!r}, which refseg does not load (it loads "
                         f"{', '.join(sorted({c for f in FAMILIES.values() for c in f.pipeline_classes}))})")
    return family


def _load_folder(path: str, dtype: torch.dtype) -> tuple[Family, dict]:
    family = _folder_family(path)
    missing = [c for c in family.components if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ModelError(f"cannot load model {path!r}: not a diffusers folder (missing "
                         f"{', '.join(m + '/' for m in missing)}). {ACCEPTED_FORMS}")
    try:
        return family, family.load(path, dtype, local_files_only=True)
    except (ModelError, OSError) as exc:  # a component that cannot be loaded (families/base.py load_component)
        raise ModelError(f"cannot load model {path!r}: {first_line(exc)}") from None


def _hub_components(repo_id: str, dtype: torch.dtype, local_files_only: bool) -> tuple[Family, dict]:
    # deferred: heavy, and config_only and the plan import this module without loading a model
    from diffusers import DiffusionPipeline

    try:
        index = dict(DiffusionPipeline.load_config(repo_id, local_files_only=local_files_only))
    except OSError:
        index = None  # no model_index.json: SD1.x's subfolders (else `load` raises the same OSError)
    family = FAMILIES["sd"] if index is None else family_for_index(index)
    if family is None:
        raise ModelError(f"cannot load model {repo_id!r}: its model_index.json names pipeline "
                         f"{index.get('_class_name')!r}, which refseg does not load")
    return family, family.load(repo_id, dtype, local_files_only=local_files_only)


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[Family, dict]:
    offline = _offline()
    try:
        if not offline:
            with contextlib.suppress(OSError, ValueError, KeyError, RuntimeError):
                return _hub_components(repo_id, dtype, local_files_only=True)  # cached: no network needed
            unreachable = hub_unreachable()
            if unreachable:
                raise ModelError(f"cannot load model {repo_id!r}: it is not in the local Hugging Face cache and the "
                                 f"network is unreachable ({unreachable}); connect to the network, or use a local "
                                 f"folder or file. {ACCEPTED_FORMS}")
        return _hub_components(repo_id, dtype, local_files_only=offline)
    except OSError as exc:  # not found: not on the hub, not in the local cache, or offline
        where = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else first_line(exc)
        raise ModelError(f"cannot load model {repo_id!r}: not found ({where}). {ACCEPTED_FORMS}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load model {repo_id!r}: {first_line(exc)}") from None


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be reached (None when a connection to it opens within `timeout`).

    Without this, huggingface_hub retries a dead network for about half a minute and then reports a
    missing config.json. One TCP connection to HF_ENDPOINT (or to the HTTPS proxy, when one is set)
    says it at once; the name lookup runs in a thread so a hanging resolver cannot stall it either.
    """
    # deferred: heavy, and config_only and the plan import this module without loading a model
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    url = urlsplit(proxy or endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    probe = threading.Thread(target=connect, name="refseg-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    where = f"{'proxy ' if proxy else ''}{host}:{port}"
    if not outcome:
        return f"no answer from {where} within {timeout:g} s"
    if outcome[0] is not None:
        return f"cannot connect to {where}: {' '.join(str(outcome[0].strerror or outcome[0]).split())}"
    return None


def _load_single_file(path: str, model_config: str | None, dtype: torch.dtype) -> tuple[Family, dict]:
    """A whole checkpoint in the original (LDM / SGM) key layout, through diffusers' own converters.

    The family is the one `--model-config`'s model_index.json names; without it, the checkpoint's
    keys say (SDXL's second text encoder lives under `conditioner.embedders.1`), else SD.
    `.ckpt` files are read with `torch.load(weights_only=True)` by diffusers (no code runs).
    """
    if model_config is not None and not os.path.isfile(os.path.join(model_config, "model_index.json")):
        raise ModelError(f"--model-config {model_config!r} must be a local diffusers folder with model_index.json "
                         "and unet/ vae/ text_encoder/ tokenizer/ scheduler/ configs")
    _check_checkpoint_file(path)
    family = _folder_family(model_config) if model_config is not None else _checkpoint_family(path)
    return family, family.load_single_file(path, model_config, dtype,
                                           local_files_only=model_config is not None or _offline())


def _checkpoint_family(path: str) -> Family:
    if path.endswith(".safetensors"):
        from safetensors import safe_open  # deferred: only a single-file checkpoint needs it

        with safe_open(path, framework="pt") as f:
            if any(k.startswith("conditioner.embedders.1.") for k in f.keys()):
                return FAMILIES["sdxl"]
    return FAMILIES["sd"]


def _check_checkpoint_file(path: str) -> None:
    """Refuse a file that is not a checkpoint at all before diffusers looks for configs."""
    if path.endswith(".safetensors"):
        # deferred: heavy, and config_only and the plan import this module without loading a model
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt"):
                return
        except Exception as exc:
            raise ModelError(f"cannot load model {path!r}: not a valid .safetensors file ({first_line(exc)})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise ModelError(f"cannot load model {path!r}: not a PyTorch .ckpt file")


# ---- identity -----------------------------------------------------------------------------------
def weights_sha256(modules: dict) -> str:
    """sha256 over every tensor of the modules (name-sorted; name, dtype, shape and bytes, as loaded).

    Depends on the weights and their dtype only, not on the path they were loaded from.
    """
    h = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        for name in sorted(state):
            t = state[name].detach()
            h.update(f"{prefix}.{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---- saving -------------------------------------------------------------------------------------
def save_backbone(backbone, folder, family: Family | None = None) -> Path:
    """Write `backbone` (a `Backbone`, or a family's `build_tiny()` dict: SD1.x's unless `family`) as
    an ordinary diffusers folder.

    The folder loads through `--model DIR`, the family's diffusers pipeline `from_pretrained`, and
    serves as the `config=` / `--model-config` of a single-file checkpoint (it has `model_index.json`).
    """
    folder = Path(folder)
    if isinstance(backbone, dict):
        parts, family = backbone, family or FAMILIES["sd"]
    else:
        parts, family = backbone.components, family or backbone.family
    with _quiet():
        family.save(dict(parts), folder)
    return folder
