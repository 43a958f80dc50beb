"""VPD's referring-segmentation checkpoint -> a refseg backbone folder (+ the head's weights).

VPD (wl-zhao/VPD, `refer/train.py`) saves `{"model": VPDRefer.state_dict(), "optimizer", "epoch",
"args", "lr_scheduler"}`. Its model keys:

  unet.unet.diffusion_model.*   the fine-tuned UNet, LDM names     -> unet/ (diffusers' converter)
  encoder_vq.*                  the VAE without its decoder        -> vae/ (decoder from the base)
  text_adapter.fc.{0,2}.*, gamma  c = l + gamma * fc(l)             -> text_adapter/
  classifier.*                  LAVT's SimpleDecoding              -> the `vpd` head (`head_state`)

What the checkpoint lacks (text encoder, tokenizer, scheduler, VAE decoder) comes from a base model
in any `--model` form. The file is read by `safe_checkpoint.read_checkpoint` (no code runs).
The run directory is written by `refseg.study.vpd_run`, which needs extraction's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from refseg.backbones.loading import Backbone, load_backbone, save_backbone
from refseg.backbones.safe_checkpoint import read_checkpoint, saved_args
from refseg.backbones.text_adapter import TextAdapter, save_text_adapter
from refseg.core.errors import ModelError

UNET_PREFIX = "unet.unet.diffusion_model."
VAE_PREFIX = "encoder_vq."
ADAPTER_KEYS = ("gamma", "text_adapter.fc.0.weight", "text_adapter.fc.0.bias", "text_adapter.fc.2.weight",
                "text_adapter.fc.2.bias")
# SimpleDecoding's layers -> refseg's `vpd` head (heads/vpd.py): the coarsest fusion first.
_FUSION = {"4": "blocks.0", "3": "blocks.1", "2": "blocks.2"}
_LAYER = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4"}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def head_key_map() -> dict[str, str]:
    """VPD `classifier.*` key -> refseg `vpd` head key (conv*_4 = first fusion block ... conv1_1 = classifier)."""
    out = {}
    for level, block in _FUSION.items():
        for layer, index in _LAYER.items():
            names = ("weight",) if layer.startswith("conv") else _BN
            for name in names:
                out[f"classifier.{layer}_{level}.{name}"] = f"{block}.{index}.{name}"
    out["classifier.conv1_1.weight"] = "classifier.weight"
    out["classifier.conv1_1.bias"] = "classifier.bias"
    return out


@dataclass
class VPDCheckpoint:
    """The parts of a VPD checkpoint refseg uses, as float32 tensors, and its saved settings."""

    unet: dict  # LDM names, prefixed `model.diffusion_model.` as diffusers' converter expects
    vae: dict  # LDM names, prefixed `first_stage_model.`
    adapter: dict  # TextAdapter state: fc.*, gamma
    head: dict  # refseg `vpd` head state
    args: dict = field(default_factory=dict)  # the saved argparse Namespace, as plain data
    skipped: list = field(default_factory=list)  # top-level entries not read (optimizer, ...)

    @property
    def head_hidden(self) -> int:
        return int(self.head["classifier.weight"].shape[1])


def read_vpd_checkpoint(path) -> VPDCheckpoint:
    """Read and check a VPD checkpoint; one `ModelError` line naming the missing keys if it is not one."""
    ck = read_checkpoint(path)
    state = ck.get("model", ck)
    if not isinstance(state, dict):
        raise ModelError(f"{path} is not a VPD checkpoint: its 'model' entry is a {type(state).__name__}")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if state and all(k.startswith("module.") for k in state):  # saved from the DDP wrapper itself
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = _missing_keys(state)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelError(f"{path} is not a VPD referring-segmentation checkpoint: missing {shown}")

    def f32(t):  # VPD saves fp32; a fp16 copy upcasts exactly
        return t.float() if t.is_floating_point() else t

    return VPDCheckpoint(
        unet={"model.diffusion_model." + k[len(UNET_PREFIX):]: f32(v) for k, v in state.items()
              if k.startswith(UNET_PREFIX)},
        vae={"first_stage_model." + k[len(VAE_PREFIX):]: f32(v) for k, v in state.items() if k.startswith(VAE_PREFIX)},
        adapter={k.replace("text_adapter.", ""): f32(state[k]) for k in ADAPTER_KEYS},
        head={new: f32(state[old]) for old, new in head_key_map().items()},
        args=saved_args(ck),
        skipped=[k for k in ck if k not in ("model", "args")] if "model" in ck else [],
    )


def _missing_keys(state: dict) -> list[str]:
    missing = [k for k in (*ADAPTER_KEYS, *head_key_map()) if k not in state]
    for prefix, example in ((UNET_PREFIX, "input_blocks.0.0.weight"), (VAE_PREFIX, "encoder.conv_in.weight")):
        if not any(k.startswith(prefix) for k in state):
            missing.insert(0, prefix + "*")
        elif prefix + example not in state:
            missing.insert(0, prefix + example)
    return missing


def build_backbone(ck: VPDCheckpoint, base: Backbone) -> tuple[Backbone, TextAdapter]:
    """`base` with VPD's UNet and VAE encoder loaded into it (in place), and VPD's adapter."""
    unet_state = convert_ldm_unet_checkpoint(ck.unet, dict(base.unet.config))
    _load_into(base.unet, unet_state, "UNet", strict=True)
    vae_state = convert_ldm_vae_checkpoint(ck.vae, dict(base.vae.config))
    if any(k.startswith("decoder.") for k in vae_state):
        raise ModelError("the checkpoint's encoder_vq holds a VAE decoder: not VPD's format")
    _load_into(base.vae, vae_state, "VAE encoder", strict=False)  # the decoder stays the base's
    dim = int(ck.adapter["gamma"].numel())
    width = int(base.text_encoder.config.hidden_size)
    if dim != width:
        raise ModelError(f"the checkpoint's text adapter is {dim} wide but the base text encoder gives {width}: "
                         "wrong --base-model")
    adapter = TextAdapter(dim)
    _load_into(adapter, ck.adapter, "text adapter", strict=True)
    return base, adapter


def _load_into(module: torch.nn.Module, state: dict, what: str, strict: bool) -> None:
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state] if strict else []
    if unknown or wrong or missing:
        bad = (wrong or unknown or missing)[0]
        kind = "has another shape" if wrong else ("is unknown" if unknown else "is missing")
        raise ModelError(f"the checkpoint's {what} does not fit the base model: {bad} {kind} "
                         f"({len(wrong)} shape mismatches, {len(unknown)} unknown, {len(missing)} missing); "
                         "is --base-model the model VPD was trained from?")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=strict)


def write_vpd_backbone(checkpoint, base_model: str, out, *, model_config: str | None = None):
    """Write `out` (a backbone folder with `text_adapter/`) -> (VPDCheckpoint, its parts table rows)."""
    ck = read_vpd_checkpoint(checkpoint)
    base = load_backbone(base_model, model_config=model_config, device="cpu", dtype="fp32")
    base_counts = {"VAE decoder": _count(base.vae, "decoder.")}
    backbone, adapter = build_backbone(ck, base)
    save_backbone(backbone, Path(out))
    save_text_adapter(adapter, Path(out))
    rows = [
        ("UNet (fine-tuned)", _count(backbone.unet), "checkpoint: unet.unet.diffusion_model.*"),
        ("VAE encoder + quant convs", _count(backbone.vae) - base_counts["VAE decoder"], "checkpoint: encoder_vq.*"),
        ("VAE decoder", base_counts["VAE decoder"], f"base: {base_model}"),
        ("text adapter (MLP + gamma)", _count(adapter), "checkpoint: text_adapter.*, gamma"),
        ("text encoder", _count(backbone.text_encoder), f"base: {base_model}"),
        ("tokenizer", len(backbone.tokenizer.get_vocab()), f"base: {base_model} (vocabulary entries)"),
        ("scheduler", 0, f"base: {base_model} (config only)"),
    ]
    return ck, rows


def _count(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(v.numel() for k, v in module.state_dict().items()
               if k.startswith(prefix) and not k.endswith("num_batches_tracked"))
