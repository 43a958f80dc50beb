"""Predict masks for a user's own images and sentences: backbone + head run directly, no cache.

`predict_pairs(model, run, pairs)` (and `refseg-predict`) does what `refseg-extract` followed by
`refseg.heads.evaluate.predict` does, sample by sample, at the run's extraction settings (image
size, token length, latent scaling, noise level and timestep, precision): the same transforms, the
same text adapter, the same rounding the cache applies to latents, embeddings and features
(`store_dtype`: float16, or float32 for a run trained on a `--cache-dtype fp32` cache), the same head
and upsampling. So the S x S mask it returns equals the cache path's;
the mask it writes is the same logits resized to the image's original size.

It lives in `refseg.study` because it composes extraction and a head (DESIGN §2: `extract` and
`heads` never import each other).
"""

from __future__ import annotations

import csv
import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refseg.backbones.loading import Backbone, load_backbone
from refseg.core.cli import warn
from refseg.core.errors import DataError, ModelError
from refseg.core.noise import add_noise, alphas_cumprod, make_noise
from refseg.core.precision import ieee_float32
from refseg.core.transforms import image_to_tensor, load_image
from refseg.backbones.capture import UNetCapture
from refseg.extract.pipeline import batch_invariant
from refseg.heads import run_dir
from refseg.heads.batches import autocast
from refseg.heads.evaluate import load_head
from refseg.heads.overlays import overlay_image, save_png
from refseg.heads.scoring import logits_to_mask

# what refseg-extract stores latents, embeddings and features as (--cache-dtype; cache/layout.py CACHE_DTYPES)
# (an int8 store's latents and embeddings are float16; its features' 8-bit rounding is not replayed here:
# heads take it as storage, like the float type, heads/caches.py STORAGE_KEYS)
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.float16}


@dataclass
class Prediction:
    """One (image, sentence): masks (S x S as `heads.predict` gives, and at the original size), logits,
    and the intermediate tensors (latent, embedding, features) as the cache would hold them."""

    image: str
    text: str
    mask: np.ndarray  # bool (S, S)
    mask_original: np.ndarray  # bool (H, W)
    logits: torch.Tensor  # (2, h, w) float32, at the head's stride
    tensors: dict = field(default_factory=dict)  # latent, input_ids, attention_mask, embedding, s8, ...


@dataclass
class LoadedRun:
    """A backbone and a run's head, with the run's extraction settings."""

    backbone: Backbone
    head: torch.nn.Module
    config: dict
    extraction: dict
    spec: object
    checkpoint: str

    @property
    def store_dtype(self) -> torch.dtype:
        """The type the run's training cache stored its tensors in (float16 unless --cache-dtype fp32)."""
        return STORE_DTYPES[self.extraction.get("cache_dtype", "float16")]

    @functools.cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod(self.backbone.scheduler_config)


def load_run(model: str, run, *, model_config=None, device="auto", dtype="auto", checkpoint="best") -> LoadedRun:
    """Load `model` and `run`'s head; refuse a backbone other than the one the run's features came from."""
    config = run_dir.read_config(run)
    extraction = (config["cache"].get("settings") or {}).get("extraction") or {}
    missing = [k for k in ("image_size", "token_length", "latent_scaling", "strides", "attn_strides") if k not in extraction]
    if missing:
        raise ModelError(f"run {run} does not record its extraction settings ({', '.join(missing)})")
    backbone = load_backbone(model, model_config=model_config, device=device, dtype=dtype)
    _check_backbone(backbone, config, extraction, run)
    head, config, used = load_head(run, checkpoint, backbone.device)
    spec = backbone.spec(int(extraction["image_size"]), int(extraction["token_length"]),
                         tuple(extraction["strides"]), tuple(extraction["attn_strides"]))
    return LoadedRun(backbone, head, config, extraction, spec, used)


def _check_backbone(backbone: Backbone, config: dict, extraction: dict, run) -> None:
    """The run's backbone identity must be this one's (where it lives aside). The weights' hash
    depends on the precision, so at a precision other than the run's it is not compared."""
    recorded = dict((config["cache"].get("settings") or {}).get("backbone") or {})
    ours = dict(backbone.identity)
    skip = {"model", "model_config"}
    if extraction.get("dtype") != str(backbone.dtype).replace("torch.", ""):
        skip.add("weights_sha256")
        if "text_adapter" in recorded and "text_adapter" in ours:
            recorded["text_adapter"] = {k: v for k, v in recorded["text_adapter"].items() if k != "weights_sha256"}
            ours["text_adapter"] = {k: v for k, v in ours["text_adapter"].items() if k != "weights_sha256"}
    for key in sorted((set(recorded) | set(ours)) - skip):
        if json.loads(json.dumps(recorded.get(key))) != json.loads(json.dumps(ours.get(key))):
            raise ModelError(f"--model {backbone.identity.get('model')} is not the backbone run {run} was trained on: "
                             f"its {key} differs")


def read_pairs_csv(path) -> list[tuple[str, str]]:
    """`image,text` rows (a header line `image,text` is skipped); relative images are relative to the CSV."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read pairs file {path}: {exc}") from None
    pairs = []
    for n, row in enumerate(rows, 1):
        if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["image", "text"]):
            continue
        if len(row) < 2:
            raise DataError(f"{path}:{n}: expected 'image,text', got {','.join(row)!r}")
        if not ",".join(row[1:]).strip():
            raise DataError(f"{path}:{n}: the sentence for image {row[0].strip()!r} is empty")
        image = Path(row[0].strip())
        pairs.append((str(image if image.is_absolute() else path.parent / image), ",".join(row[1:]).strip()))
    if not pairs:
        raise DataError(f"{path} holds no image,text pairs")
    return pairs


def predict_pairs(model: str, run, pairs, *, model_config=None, device="auto", dtype="auto", checkpoint="best",
                  batch_size: int = 4, store_dtype=None) -> list[Prediction]:
    """Masks for each (image path, sentence) of `pairs` with `model` and `run`'s head (see the module doc).

    `store_dtype`: the precision the intermediate tensors are rounded to between stages, as the
    cache stores them; None (default): as the run's training cache did (`LoadedRun.store_dtype`);
    torch.float32 skips the rounding.
    """
    loaded = load_run(model, run, model_config=model_config, device=device, dtype=dtype, checkpoint=checkpoint)
    return predict_loaded(loaded, pairs, batch_size=batch_size, store_dtype=store_dtype)


def predict_loaded(loaded: LoadedRun, pairs, *, batch_size: int = 4, store_dtype=None) -> list[Prediction]:
    store_dtype = loaded.store_dtype if store_dtype is None else store_dtype
    pairs = [(str(image), str(text)) for image, text in pairs]
    if not pairs:
        raise DataError("nothing to predict: give at least one image and sentence")
    for n, (image, text) in enumerate(pairs, 1):
        if not text.strip():
            raise DataError(f"pair {n} ({image}) has an empty sentence")
    _warn_truncated(loaded, pairs)
    out = []
    bb = loaded.backbone
    with UNetCapture(bb.unet, loaded.spec) as capture, torch.inference_mode(), ieee_float32(bb.device, bb.dtype):
        for start in range(0, len(pairs), max(1, batch_size)):
            out += _predict_batch(loaded, capture, pairs[start:start + batch_size], start, store_dtype)
    return out


def _predict_batch(loaded: LoadedRun, capture: UNetCapture, pairs, first: int, store_dtype) -> list[Prediction]:
    """Extraction's three stages and the head on one batch; `first` numbers the inputs (noise seeds)."""
    bb, ex, size = loaded.backbone, loaded.extraction, int(loaded.extraction["image_size"])
    sizes = [_original_size(image) for image, _ in pairs]
    # stage 1a, as Extraction.latents: squash, VAE mode, (scale), rounded as the cache stores it
    x = torch.stack([image_to_tensor(load_image(image, target_size=size), size) for image, _ in pairs])
    scale = bb.scaling_factor if ex["latent_scaling"] == "sd" else 1.0
    z0 = batch_invariant(bb, lambda b: bb.vae.encode(b).latent_dist.mode(), x.to(bb.device, bb.dtype)) * scale
    z0 = z0.to(store_dtype).float().cpu()
    # stage 1b, as Extraction.text: tokens, text encoder (+ adapter)
    tok = bb.tokenizer([text for _, text in pairs], padding="max_length", max_length=int(ex["token_length"]),
                       truncation=True, return_tensors="pt")
    emb = batch_invariant(bb, bb.encode_text, tok["input_ids"].to(bb.device)).to(store_dtype)
    # stage 2, as Extraction._unet: noise level T (input i is image_id i for the noise seed), UNet
    t, timestep = int(loaded.config["noise_t"]), int(loaded.config.get("timestep", loaded.config["noise_t"]))
    eps = torch.stack([make_noise(tuple(z0.shape[1:]), int(ex.get("noise_seed", 0)), first + i, t)
                       for i in range(len(pairs))])
    zt = add_noise(z0, t, eps, loaded.alphas_cumprod).to(bb.device, bb.dtype)
    steps = torch.full((len(pairs),), timestep, dtype=torch.long, device=bb.device)
    captured = batch_invariant(bb, capture.run, zt, steps, emb.to(bb.device, bb.dtype))
    features = {name: captured[name].to(store_dtype) for name in loaded.head.tensor_names}
    # the head, as heads.scoring.score_samples reads the cache (float32 in, autocast policy)
    head_device = next(loaded.head.parameters()).device
    text_mask = tok["attention_mask"].to(head_device).bool()
    with autocast(head_device):
        logits = loaded.head({k: v.to(head_device).float() for k, v in features.items()},
                             emb.to(head_device).float(), text_mask).float()
    masks = logits_to_mask(logits, (size, size)).cpu().numpy()
    out = []
    for i, (image, text) in enumerate(pairs):
        tensors = {"latent": z0[i], "input_ids": tok["input_ids"][i], "attention_mask": tok["attention_mask"][i],
                   "embedding": emb[i].float().cpu(), **{k: v[i].float().cpu() for k, v in features.items()}}
        original = logits_to_mask(logits[i:i + 1], sizes[i])[0].cpu().numpy()
        out.append(Prediction(image, text, masks[i], original, logits[i].cpu(), tensors))
    return out


def _warn_truncated(loaded: LoadedRun, pairs) -> None:
    """One warning line per sentence longer than the run's token length (it is cut, as extraction cuts it)."""
    length = int(loaded.extraction["token_length"])
    for n, (image, text) in enumerate(pairs, 1):
        count = len(loaded.backbone.tokenizer(text, truncation=False, verbose=False)["input_ids"])
        if count > length:
            shown = text if len(text) <= 60 else text[:57] + "..."
            warn(f"pair {n} ({image}): the sentence {shown!r} has {count} tokens, cut to the run's token length "
                 f"{length}")


def _original_size(path) -> tuple[int, int]:
    """(H, W) of the image file as stored, read from its header: nothing is decoded here (a 10000² photo
    is decoded once, at a reduced scale where its format allows, by load_image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image says what is too big
            with Image.open(path) as image:
                return image.height, image.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        load_image(path)  # the DataError naming the file and what is wrong with it
        raise


# ---- files ----------------------------------------------------------------------------------------
def write_predictions(predictions: list[Prediction], out, settings: dict) -> Path:
    """OUT/NNN_mask.png (0/255, original size), OUT/NNN_overlay.png, and OUT/predictions.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for n, p in enumerate(predictions):
        mask_file, overlay_file = f"{n:03d}_mask.png", f"{n:03d}_overlay.png"
        save_png(Image.fromarray(p.mask_original.astype(np.uint8) * 255), out / mask_file)
        image, mask = _for_overlay(p.image, p.mask_original)
        save_png(overlay_image(image, mask, None, p.text), out / overlay_file)  # no ground truth here
        records.append({"image": p.image, "text": p.text, "mask": mask_file, "overlay": overlay_file,
                        "height": int(p.mask_original.shape[0]), "width": int(p.mask_original.shape[1]),
                        "mask_area": int(p.mask_original.sum()), "mask_area_fraction": float(p.mask_original.mean())})
    run_dir.write_json(out / "predictions.json", {"settings": settings, "predictions": records})
    return out / "predictions.json"


OVERLAY_MAX_SIDE = 1024  # an overlay is for looking at: a huge photo is drawn downscaled (the mask PNG is not)


def _for_overlay(path, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The image (decoded at a reduced scale where its format allows) and the mask, at most
    OVERLAY_MAX_SIDE pixels on the long side."""
    image = load_image(path, target_size=OVERLAY_MAX_SIDE)
    h, w = mask.shape
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    if (w, h) != size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)).astype(bool)
    return image, mask


def settings_record(loaded: LoadedRun, model: str, run) -> dict:
    """What predictions.json says was used."""
    return {"model": str(model), "run": str(run), "checkpoint": loaded.checkpoint, "head": loaded.config["head"],
            "device": str(loaded.backbone.device), "dtype": str(loaded.backbone.dtype).replace("torch.", ""),
            "noise_t": int(loaded.config["noise_t"]), "timestep": int(loaded.config.get("timestep", 0)),
            "extraction": loaded.extraction, "text_adapter": loaded.backbone.text_adapter is not None}
