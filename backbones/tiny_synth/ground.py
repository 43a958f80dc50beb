"""Stage C end to end: load a trained tiny-synth, render grounding scenes, fine-tune, measure, export.

    python -m refseg.backbones.tiny_synth ground --base BASE --work WORK --out backbones/assets/tiny-synth

BASE is the stage-A/B model (a diffusers folder, loaded in float32); its VAE, tokenizer and scheduler
are kept as they are, its UNet and text encoder are fine-tuned (`train_ground`). Deterministic on a
given machine and thread count, like stages A and B; resumable from WORK/ground.pt.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as dlog
from transformers import CLIPTextModel, CLIPTokenizer

from refseg.backbones.loading import weights_sha256
from refseg.backbones.tiny_synth.data import to_model_range
from refseg.backbones.tiny_synth.grounding_data import check_one_token_per_word, grounding_set
from refseg.backbones.tiny_synth.train import export
from refseg.backbones.tiny_synth.train_ground import GroundConfig, held_out_pointing, train_ground
from refseg.backbones.tiny_synth.train_unet import encode_posteriors, held_out_loss
from refseg.core.errors import RunError

HELD_OUT = 48  # stage C scenes after the training ones: pointing and epsilon MSE on the model card
POINTING_TS = (0, 500)


def load_parts(base) -> dict:
    """The base model's parts in float32 on the CPU (the shipped files are float16)."""
    base = str(base)
    try:
        return dict(
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32),
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=torch.float32),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        )
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot load the base model {base!r}: {str(exc).splitlines()[0]}") from None


def ground(cfg: GroundConfig, base, work, out=None, *, resume: bool = False, log=print,
           checkpoint_seconds: float = 180.0, held_out: int = HELD_OUT) -> dict:
    """Run (or resume) stage C in `work` from `base`; export to `out` if given. Returns the summary.

    `held_out` scenes after the training ones give the model card's figures (0: none, for tests)."""
    dlog.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if not resume and (work / "ground.pt").exists():
        raise RunError(f"{work} already holds a stage C run: pass --resume to continue it, or use an empty --work")
    parts = load_parts(base)
    for m in (parts["vae"], parts["unet"], parts["text_encoder"]):
        m.eval().requires_grad_(False)
    base_sha = _weights_sha256(parts)

    t0, cpu0 = time.monotonic(), time.process_time()
    data = StageCData.build(cfg, held_out, parts["vae"], parts["tokenizer"])
    log(f"stage C: {cfg.scenes} + {held_out} scenes, {len(data.train)} training captions and sentences, "
        f"latents encoded ({time.monotonic() - t0:.0f}s)")
    tokens = Tokens(parts["tokenizer"])

    before = measure(parts, data, tokens, cfg)
    log(f"stage C base: held-out {json.dumps(before)}")
    state = train_ground(parts["unet"], parts["text_encoder"], parts["scheduler"], data.latents, data.masks,
                         [s for s in data.train if s.kind == "caption"],
                         [s for s in data.train if s.kind == "sentence"],
                         tokens.tokenize, tokens.empty_ids, cfg, work, log, checkpoint_seconds)
    after = measure(parts, data, tokens, cfg)
    log(f"stage C done: held-out {json.dumps(after)}")

    summary = _summary(cfg, base, base_sha, state, cpu0, data, before, after, parts)
    (work / "ground_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (work / "ground_history.json").write_text(json.dumps(state["history"]) + "\n")
    if out is not None:
        _export(parts, base, out, summary)
        log(f"wrote {out}")
    return summary


@dataclass
class StageCData:
    """Stage C's scenes: the VAE's scaled posterior (means, stds) per scene, the object masks at latent
    size, and the samples (training ones; held-out sentences and captions for the figures)."""

    latents: tuple[torch.Tensor, torch.Tensor]
    masks: list
    train: list
    held_sentences: list
    held_captions: list

    @classmethod
    def build(cls, cfg: GroundConfig, held_out: int, vae, tokenizer) -> "StageCData":
        images, masks, samples = grounding_set(cfg.seed, cfg.scenes + held_out, cfg.image_size, cfg.image_size // 8)
        check_one_token_per_word(tokenizer, samples)
        train = [s for s in samples if s.scene < cfg.scenes]
        held_sentences = [s for s in samples if s.scene >= cfg.scenes and s.kind == "sentence"]
        held_captions = [s for s in samples if s.scene >= cfg.scenes and s.kind == "caption"]
        means, stds = encode_posteriors(vae, to_model_range(images))
        scale = float(vae.config.scaling_factor)
        return cls((means * scale, stds * scale), masks, train, held_sentences, held_captions)


class Tokens:
    """The base model's tokenizer as stage C asks it: samples' texts, and the empty prompt, to a length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, batch, length):
        return self.tokenizer([s.text for s in batch], padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids

    def empty_ids(self, length):
        return self.tokenizer([""], padding="max_length", max_length=length, return_tensors="pt").input_ids[0]


def measure(parts: dict, data: StageCData, tokens: Tokens, cfg: GroundConfig) -> dict | None:
    """The model card's held-out figures: pointing of the sentences' maps, and the captions' epsilon MSE."""
    if not data.held_sentences:  # held_out=0 (tests): no figures
        return None
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    pointing = held_out_pointing(unet, text_encoder, data.latents[0], data.masks, data.held_sentences,
                                 tokens.tokenize, cfg.sentence_length, POINTING_TS, scheduler, cfg.seed)
    z0 = data.latents[0][torch.tensor([s.scene for s in data.held_captions])]
    mse = held_out_loss(unet, text_encoder, scheduler, z0, tokens.tokenize(data.held_captions, cfg.caption_length),
                        tokens.empty_ids(cfg.caption_length), cfg.seed)
    return {"pointing": pointing, "eps_mse": mse}


def _weights_sha256(parts: dict) -> str:
    return weights_sha256({"vae": parts["vae"], "unet": parts["unet"], "text_encoder": parts["text_encoder"]})


def _summary(cfg: GroundConfig, base, base_sha: str, state: dict, cpu0: float, data: StageCData, before, after,
             parts: dict) -> dict:
    return {
        "config": cfg.as_dict(),
        "base": {"path": str(base), "weights_sha256": base_sha},
        "steps": state["step"],
        "seconds": round(state["seconds"], 1),  # the training loop's wall time, summed over resumptions
        # the whole command's CPU time (this invocation: data, training, measures): on a shared machine
        # the wall time above includes waiting for the CPU
        "process_cpu_seconds": round(time.process_time() - cpu0, 1),
        "final_train_loss": state["history"][-1],
        "held_out_sentences": len(data.held_sentences),
        "held_out": {"base": before, "grounded": after},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine()},
        "weights_sha256_fp32": _weights_sha256(parts),
    }


def _export(parts: dict, base, out, summary: dict) -> None:
    """The grounded model as a diffusers folder at `out`, its training.json extended by `summary`."""
    previous = _previous_training(base)
    record = dict(previous, grounding=summary) if previous else {"grounding": summary}
    export(parts, out, record)
    for part in ("unet", "vae"):  # from_pretrained recorded the base's path: not part of the model
        config = Path(out) / part / "config.json"
        data = json.loads(config.read_text())
        data.pop("_name_or_path", None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _previous_training(base) -> dict | None:
    """The base's training.json, its own grounding run (when the base was grounded already: a continued
    stage C) appended to `earlier_grounding`, so the exported record names every run that made it."""
    path = Path(base) / "training.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    grounding = record.pop("grounding", None)
    if grounding is not None:
        record["earlier_grounding"] = [*record.get("earlier_grounding", []), grounding]
    return record
