"""Evaluate a trained head on a cache: `evaluate` (metrics, JSON, per-sample CSV, overlays) and
`predict` (per-sample boolean masks). Training's per-epoch validation runs `evaluate_model`, the
same code path.

Protocol `vpd` (LAVT/VPD, default): logits upsampled bilinearly (align_corners=True) to S x S,
foreground only where logit1 > logit0 (ties -> background), compared with the cache's GT masks
(already at S x S, nearest). Protocol `original`: logits resized to the image's original H x W the
same way, compared with the union of the ref's polygons at full resolution (read from the dataset).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from refseg.cache import FeatureDataset, open_cache
from refseg.heads import run_dir
from refseg.heads.registry import build_head
from refseg.core.errors import CacheMismatchError, RefsegError, RunError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.metrics import RefSegMetrics

PROTOCOLS = ("vpd", "original")


# ---- small shared pieces (train.py uses them too) -----------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RefsegError("--device cuda was asked for but CUDA is not available (use --device cpu or auto)")
    return device


def as_cache(cache):
    """An opened cache from a path (or an already opened one); -> (cache, path)."""
    if isinstance(cache, (str, Path)):
        return open_cache(cache), Path(cache)
    return cache, Path(cache.path)


def check_compatible(run_settings: dict, cache_settings: dict, run_name: str, cache_name: str,
                     reference: str = "the run") -> None:
    """Refuse a cache whose backbone or extraction settings differ from the run's (one line).

    The dataset part may differ (a run trained on the train split is evaluated on val).
    """
    for part in ("backbone", "extraction"):
        a, b = run_settings.get(part) or {}, cache_settings.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise CacheMismatchError(
                    f"cache {cache_name} is incompatible with {run_name}: {part}.{key} is "
                    f"{_short(b.get(key))} in the cache but {_short(a.get(key))} in {reference}")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def batch_to_device(batch: dict, device: torch.device, non_blocking: bool = False):
    features = {k: v.to(device, non_blocking=non_blocking).float() for k, v in batch["features"].items()}
    text = batch.get("text_embedding")
    mask = batch.get("text_mask")
    if text is not None:
        text = text.to(device, non_blocking=non_blocking).float()
        mask = mask.to(device, non_blocking=non_blocking).bool()
    return features, text, mask


def make_loader(dataset, batch_size: int | None, device: torch.device, *, sampler=None, batch_sampler=None,
                workers: int = 0) -> DataLoader:
    if batch_sampler is not None:  # it makes the batches: DataLoader takes no batch_size then
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def autocast(device: torch.device):
    # bf16 on GPU (the heads are small, the features are f16 already); fp32 on CPU.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def logits_to_mask(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, 2, h, w) logits -> (B, H, W) bool: bilinear (align_corners=True), then fg where logit1 > logit0."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
    return logits[:, 1] > logits[:, 0]


@torch.no_grad()
def iterate_logits(model, dataset, *, device, batch_size=16, workers=0):
    """Yield (rows (B,), logits (B, 2, h, w) float32 on device, gt (B, S, S) uint8) over `dataset`."""
    was_training = model.training
    model.eval()
    try:
        for batch in make_loader(dataset, batch_size, device, workers=workers):
            features, text, mask = batch_to_device(batch, device)
            with autocast(device):
                logits = model(features, text, mask)
            yield batch["row"].tolist(), logits.float(), batch["gt"]
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_model(model, dataset, *, device, batch_size=16, workers=0, progress=False) -> tuple[dict, list[dict]]:
    """Protocol `vpd` over `dataset` -> (summary, per-sample [{row, iou, i, u}]). Used by training's val."""
    metrics = RefSegMetrics()
    records = []
    for rows, logits, gt in _maybe_progress(iterate_logits(model, dataset, device=device, batch_size=batch_size,
                                                           workers=workers), len(dataset), batch_size, progress):
        pred = logits_to_mask(logits, gt.shape[-2:]).cpu().numpy()
        gt = gt.numpy() != 0
        for row, p, g in zip(rows, pred, gt):
            i, u = int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))
            records.append({"row": row, "iou": metrics.add(i, u), "i": i, "u": u})
    return metrics.summary(), records


def _maybe_progress(iterable, n, batch_size, progress):
    if not progress:
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="sample", desc="eval", dynamic_ncols=True) as bar:
        for item in iterable:
            yield item
            bar.update(len(item[0]))


# ---- loading a run against a cache ---------------------------------------------------------------
def load_head(run, checkpoint: str = "best", device="cpu"):
    """Rebuild a run's head from its config.json and load its weights -> (model, config, checkpoint used)."""
    cfg = run_dir.read_config(run)
    path, used = run_dir.checkpoint_path(run, checkpoint)
    try:
        model = build_head(cfg["head"], FeatureSpec.from_dict(cfg["spec"]), **cfg["head_args"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"cannot rebuild head {cfg['head']!r} of {run} from its config.json: {exc}") from None
    state = run_dir.load_weights(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: weights of another head or other head settings
        raise RunError(f"{path} does not fit head {cfg['head']!r} {cfg['head_args']} of {run}: "
                       f"{run_dir.first_mismatch(exc)}") from None
    if missing or unexpected:
        raise RunError(f"{path} does not fit head {cfg['head']!r}: missing {list(missing)[:3]}, "
                       f"unexpected {list(unexpected)[:3]}")
    return model.to(device).eval(), cfg, used


def _prepare(run, cache, noise_t, checkpoint, device, allow_noise_mismatch):
    device = resolve_device(device)
    cfg = run_dir.read_config(run)  # a bad run fails before the cache is touched
    cache, cache_path = as_cache(cache)
    check_compatible(cfg["cache"]["settings"], cache.settings, f"run {run}", str(cache_path))
    if noise_t is None:
        noise_t = cfg["noise_t"]
    elif int(noise_t) != int(cfg["noise_t"]) and not allow_noise_mismatch:
        raise RefsegError(f"run {run} was trained at noise T={cfg['noise_t']} but T={noise_t} was asked for: "
                          "pass --allow-noise-mismatch for a transfer study")
    noise_t = int(noise_t)
    cache.done(noise_t)  # a missing noise level raises the cache's CacheError here
    model, cfg, used = load_head(run, checkpoint, device)
    missing = [n for n in model.tensor_names if n not in cache.spec]
    if missing:
        raise CacheMismatchError(f"cache {cache_path} lacks {', '.join(missing)}, which head {cfg['head']!r} reads")
    dataset = FeatureDataset(cache_path, noise_t, names=model.tensor_names, text=model.uses_text)
    return model, cfg, used, cache, cache_path, noise_t, dataset, device


def predict(run, cache, noise_t=None, *, checkpoint="best", device="auto", batch_size=16,
            allow_noise_mismatch=False):
    """Per finished sample, {"row", "sent_id", "ref_id", "pred": bool (S, S)} (protocol `vpd`), as an iterator.

    The run and cache are checked now (errors raise here); predictions are computed as you iterate.
    """
    model, cfg, used, cache, _, noise_t, dataset, device = _prepare(
        run, cache, noise_t, checkpoint, device, allow_noise_mismatch)
    index = cache.index

    def generate():
        for rows, logits, gt in iterate_logits(model, dataset, device=device, batch_size=batch_size):
            pred = logits_to_mask(logits, gt.shape[-2:]).cpu().numpy()
            for row, p in zip(rows, pred):
                yield {"row": row, "sent_id": int(index["sent_id"][row]), "ref_id": int(index["ref_id"][row]),
                       "pred": p}

    return generate()


def evaluate(run, cache, noise_t=None, *, protocol="vpd", checkpoint="best", json_out=None, per_sample=None,
             overlays=None, max_overlays=16, data_root=None, device="auto", batch_size=16,
             allow_noise_mismatch=False, progress=False) -> dict:
    """Metrics of a run on a cache -> summary {"P@0.5".."P@0.9", "oIoU", "mIoU", "n"} (percent)."""
    if protocol not in PROTOCOLS:
        raise RefsegError(f"unknown protocol {protocol!r} (choose {' or '.join(PROTOCOLS)})")
    model, cfg, used, cache, cache_path, noise_t, dataset, device = _prepare(
        run, cache, noise_t, checkpoint, device, allow_noise_mismatch)
    refer = None
    if protocol == "original" or overlays:
        refer = _refer_dataset(cache, data_root)  # fail on a missing dataset before the long part
    index = cache.index
    texts = cache.texts

    metrics = RefSegMetrics()
    records, drawn = [], 0
    gt_cache: dict[int, np.ndarray] = {}
    for rows, logits, gt in _maybe_progress(iterate_logits(model, dataset, device=device, batch_size=batch_size),
                                            len(dataset), batch_size, progress):
        preds_s = logits_to_mask(logits, gt.shape[-2:]).cpu().numpy()
        for k, row in enumerate(rows):
            ref_id = int(index["ref_id"][row])
            if protocol == "vpd":
                pred, target = preds_s[k], gt[k].numpy() != 0
            else:
                if ref_id not in gt_cache:
                    gt_cache = {ref_id: refer.mask(ref_id, rule="union")}  # sentences of a ref are adjacent
                target = gt_cache[ref_id]
                pred = logits_to_mask(logits[k:k + 1], target.shape)[0].cpu().numpy()
            i, u = int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))
            iou = metrics.add(i, u)
            record = {"sent_id": int(index["sent_id"][row]), "ref_id": ref_id, "iou": iou, "i": i, "u": u}
            records.append(record)
            if overlays and drawn < max_overlays:
                from refseg.heads.overlays import draw_overlay

                image_id = int(index["image_id"][row])
                draw_overlay(refer.image_path(image_id), pred, target, f"{texts[row]}  (IoU {100 * iou:.1f})",
                             Path(overlays) / f"{drawn:03d}_sent{record['sent_id']}.png")
                drawn += 1

    summary = metrics.summary()
    if per_sample:
        _write_csv(per_sample, records)
    if json_out:
        info = {
            "summary": summary,
            "run": str(run), "head": cfg["head"], "checkpoint": used, "protocol": protocol,
            "noise_t": noise_t, "trained_noise_t": cfg["noise_t"],
            "cache": str(cache_path), "cache_fingerprint": cache.fingerprint, "cache_settings": cache.settings,
            "run_cache_fingerprint": cfg["cache"]["fingerprint"],
        }
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        run_dir.write_json(Path(json_out), info)
    return summary


def _write_csv(path, records) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sent_id", "ref_id", "iou", "i", "u"])
        writer.writeheader()
        for r in records:
            writer.writerow(dict(r, iou=f"{r['iou']:.6f}"))


def _refer_dataset(cache, data_root):
    from refseg.core.refer import ReferDataset  # only the original protocol and overlays need the dataset

    ds = cache.settings.get("dataset") or {}
    root = data_root or ds.get("data_root")
    if not root:
        raise RefsegError("the cache does not record its data root: pass --data-root")
    kwargs = {}
    if ds.get("image_root") and data_root is None:
        kwargs["image_root"] = ds["image_root"]
    text_field = ds.get("text_field") or (cache.settings.get("extraction") or {}).get("text_field")
    if text_field:
        kwargs["text_field"] = text_field
    return ReferDataset(root, ds.get("dataset"), ds.get("split_by", "unc"), **kwargs)
