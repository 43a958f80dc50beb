"""Loading the frozen backbone (VAE, UNet, CLIP text encoder, tokenizer, noise schedule).

`--model` accepts a Hugging Face hub id, a local diffusers folder, a single `.safetensors`/`.ckpt`
file (with `--model-config DIR` offline), `tiny` (random, built in code) or `tiny-synth` (trained,
shipped as a diffusers folder). Nothing downloads implicitly: only a hub id that is not a local
path reaches the network, never with HF_HUB_OFFLINE=1, and only when it is not in the local
Hugging Face cache already and a quick connection to the hub opens (else it fails at once, saying
so, instead of retrying for half a minute); whatever cannot be found is a `ModelError` listing
these forms.

Imported by `extract` only (it pulls in diffusers and transformers), never by `refseg_core/__init__`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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
from refseg.core.feature_spec import DEFAULT_ATTN_STRIDES, DEFAULT_STRIDES, FeatureSpec

ACCEPTED_FORMS = (
    "--model accepts: a Hugging Face hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
    "a local diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), "
    "a single .safetensors/.ckpt file (with --model-config DIR offline), 'tiny' or 'tiny-synth'"
)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_SYNTH_DIR = Path(__file__).parent / "assets" / "tiny-synth"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PROBE_SECONDS = 5.0  # how long a connection to the hub may take to open before it counts as unreachable
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class Backbone:
    """The frozen parts extraction runs; `identity` goes into the cache fingerprint."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    identity: dict
    device: torch.device
    dtype: torch.dtype
    # VPD's text adapter (backbones/text_adapter.py), from a folder's text_adapter/; None: CLIP's output as is
    text_adapter: torch.nn.Module | None = None

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the UNet is conditioned on: the text encoder's last_hidden_state, through the adapter if any."""
        embedding = self.text_encoder(input_ids)[0]
        return embedding if self.text_adapter is None else self.text_adapter(embedding)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def max_token_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def max_stride(self) -> int:
        """The coarsest feature stride (pixels): the UNet halves the latent once per level after the first,
        so an image side must be a multiple of this (64 for Stable Diffusion)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def schedule_steps(self) -> int:
        """Steps of the noise schedule (1000 for Stable Diffusion): noise levels are 0 .. this - 1."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def spec(self, image_size: int = 512, token_length: int = 40, strides=DEFAULT_STRIDES,
             attn_strides=DEFAULT_ATTN_STRIDES) -> FeatureSpec:
        """What extraction stores for this backbone at `image_size` with `token_length` tokens."""
        if token_length > self.max_token_length:
            raise ModelError(f"--token-length {token_length} exceeds the text encoder's "
                             f"{self.max_token_length} positions")
        try:
            return FeatureSpec.from_unet_config(dict(self.unet.config), image_size, token_length,
                                                self.vae_scale_factor, strides, attn_strides)
        except ValueError as exc:
            raise ModelError(str(exc)) from None


# ---- loading ------------------------------------------------------------------------------------
def load_backbone(model: str, *, model_config: str | None = None, device="auto", dtype="auto") -> Backbone:
    """Load `model` (see the module doc for the accepted forms), frozen, on `device` in `dtype`."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _quiet():
        return _load(str(model), model_config, device, dtype)


def _load(model: str, model_config: str | None, device: torch.device, dtype: torch.dtype) -> Backbone:
    if model == "tiny":
        from refseg.backbones.tiny import build_tiny

        parts, kind, name = build_tiny(), "tiny", "tiny"
        parts["scheduler_config"] = dict(parts.pop("scheduler").config)
    elif model == "tiny-synth":
        if not (TINY_SYNTH_DIR / "unet").is_dir():
            raise ModelError(f"cannot load model 'tiny-synth': it is not built in this installation "
                             f"({TINY_SYNTH_DIR} is missing); use --model tiny")
        # kind 'tiny-synth' (it was 'folder'): the fingerprint hashes it as before (cache/fingerprint.py, FORMER_KIND)
        parts, kind, name = _load_folder(str(TINY_SYNTH_DIR), dtype), "tiny-synth", "tiny-synth"
    elif os.path.isdir(model):
        parts, kind, name = _load_folder(model, dtype), "folder", os.path.abspath(model)
    elif os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt")):
            raise ModelError(f"cannot load model {model!r}: a single-file checkpoint must end in .safetensors "
                             f"or .ckpt. {ACCEPTED_FORMS}")
        parts, kind, name = _load_single_file(model, model_config, dtype), "file", os.path.abspath(model)
    elif _HUB_ID.match(model):
        parts, kind, name = _load_hub(model, dtype), "hub", model
    else:
        raise ModelError(f"cannot load model {model!r}: not found. {ACCEPTED_FORMS}")

    modules = {k: parts[k] for k in ("vae", "unet", "text_encoder")}
    for m in modules.values():
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    identity = {
        "model": name,
        "kind": kind,
        "weights_sha256": weights_sha256(modules),
        "tokenizer_sha256": _tokenizer_sha256(parts["tokenizer"]),
        "unet_config": {k: _jsonable(parts["unet"].config.get(k)) for k in (
            "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
            "down_block_types", "up_block_types", "in_channels")},
        "scheduler": {k: _jsonable(parts["scheduler_config"].get(k)) for k in (
            "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type")},
    }
    if kind == "file":
        identity["model_config"] = os.path.abspath(model_config) if model_config else None
    adapter = _text_adapter(model, kind, device, dtype)
    if adapter is not None:  # only then: caches of backbones without one keep their fingerprint
        from refseg.backbones.text_adapter import adapter_identity

        identity["text_adapter"] = adapter_identity(adapter)
    return Backbone(parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"],
                    parts["scheduler_config"], identity, device, dtype, adapter)


def _text_adapter(model: str, kind: str, device: torch.device, dtype: torch.dtype):
    """A local folder's `text_adapter/` (written by `refseg-import vpd`), frozen like the rest; else None."""
    if kind != "folder" or not os.path.isdir(model):
        return None
    from refseg.backbones.text_adapter import load_text_adapter

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
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    for log in (dlog, tlog):
        log.set_verbosity_error()
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_components(source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=local_files_only)
    return dict(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kw),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kw),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        scheduler_config=dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kw)),
    )


def _load_folder(path: str, dtype: torch.dtype) -> dict:
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ModelError(f"cannot load model {path!r}: not a diffusers folder (missing "
                         f"{', '.join(m + '/' for m in missing)}). {ACCEPTED_FORMS}")
    try:
        return _load_components(path, dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load model {path!r}: {_first_line(exc)}") from None


def _load_hub(repo_id: str, dtype: torch.dtype) -> dict:
    offline = _offline()
    try:
        if not offline:
            with contextlib.suppress(OSError, ValueError, KeyError, RuntimeError):
                return _load_components(repo_id, dtype, local_files_only=True)  # cached: no network needed
            unreachable = hub_unreachable()
            if unreachable:
                raise ModelError(f"cannot load model {repo_id!r}: it is not in the local Hugging Face cache and the "
                                 f"network is unreachable ({unreachable}); connect to the network, or use a local "
                                 f"folder or file. {ACCEPTED_FORMS}")
        return _load_components(repo_id, dtype, local_files_only=offline)
    except OSError as exc:  # not found: not on the hub, not in the local cache, or offline
        where = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else _first_line(exc)
        raise ModelError(f"cannot load model {repo_id!r}: not found ({where}). {ACCEPTED_FORMS}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load model {repo_id!r}: {_first_line(exc)}") from None


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be reached (None when a connection to it opens within `timeout`).

    Without this, huggingface_hub retries a dead network for about half a minute and then reports a
    missing config.json. One TCP connection to HF_ENDPOINT (or to the HTTPS proxy, when one is set)
    says it at once; the name lookup runs in a thread so a hanging resolver cannot stall it either.
    """
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


def _load_single_file(path: str, model_config: str | None, dtype: torch.dtype) -> dict:
    """A whole SD checkpoint in the original LDM key layout, through diffusers' own converters.

    `.ckpt` files are read with `torch.load(weights_only=True)` by diffusers (no code runs).
    """
    from diffusers import StableDiffusionPipeline

    if model_config is not None and not os.path.isfile(os.path.join(model_config, "model_index.json")):
        raise ModelError(f"--model-config {model_config!r} must be a local diffusers folder with model_index.json "
                         "and unet/ vae/ text_encoder/ tokenizer/ scheduler/ configs")
    _check_checkpoint_file(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=model_config, local_files_only=model_config is not None or _offline(),
            torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers raises anything from OSError to KeyError on a bad file
        hint = "" if model_config else (" (without --model-config the component configs come from the Hugging Face "
                                        "hub or its local cache; offline, pass --model-config DIR)")
        raise ModelError(f"cannot load model {path!r} as a single-file checkpoint: {_first_line(exc)}{hint}") from None
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                scheduler_config=dict(pipe.scheduler.config))


def _check_checkpoint_file(path: str) -> None:
    """Refuse a file that is not a checkpoint at all before diffusers looks for configs."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt"):
                return
        except Exception as exc:
            raise ModelError(f"cannot load model {path!r}: not a valid .safetensors file ({_first_line(exc)})") from None
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


def _tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# ---- saving -------------------------------------------------------------------------------------
def save_backbone(backbone, folder) -> Path:
    """Write `backbone` (a `Backbone` or `build_tiny()`'s dict) as an ordinary diffusers folder.

    The folder loads through `--model DIR`, `StableDiffusionPipeline.from_pretrained`, and serves as
    the `config=` / `--model-config` of a single-file checkpoint (it has `model_index.json`).
    """
    import diffusers

    folder = Path(folder)
    parts = backbone if isinstance(backbone, dict) else vars(backbone)
    with _quiet():
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            parts[name].save_pretrained(folder / name)
    # CLIP's own vocab.json + merges.txt too, for transformers 4.x's slow CLIPTokenizer.
    parts["tokenizer"].backend_tokenizer.model.save(str(folder / "tokenizer"))
    if "scheduler" in parts:
        parts["scheduler"].save_pretrained(folder / "scheduler")
        scheduler_class = type(parts["scheduler"]).__name__
    else:
        cfg = {k: v for k, v in parts["scheduler_config"].items() if not k.startswith("_")}
        scheduler_class = parts["scheduler_config"].get("_class_name", "DDPMScheduler")
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": scheduler_class, "_diffusers_version": diffusers.__version__, **cfg}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", type(parts["text_encoder"]).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", type(parts["unet"]).__name__],
        "vae": ["diffusers", type(parts["vae"]).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
