"""Feeding a head, the same way in training, evaluation and the benchmarks: the DataLoader over a
cache's samples, a batch moved to the device, and the autocast policy."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def make_loader(dataset, batch_size: int | None, device: torch.device, *, sampler=None, batch_sampler=None,
                workers: int = 0) -> DataLoader:
    if batch_sampler is not None:  # it makes the batches: DataLoader takes no batch_size then
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def batch_to_device(batch: dict, device: torch.device, non_blocking: bool = False):
    """-> (features {name: float32}, text_embedding float32 or None, text_mask bool or None) on `device`."""
    features = {k: v.to(device, non_blocking=non_blocking).float() for k, v in batch["features"].items()}
    text = batch.get("text_embedding")
    mask = batch.get("text_mask")
    if text is not None:
        text = text.to(device, non_blocking=non_blocking).float()
        mask = mask.to(device, non_blocking=non_blocking).bool()
    return features, text, mask


def autocast(device: torch.device):
    # bf16 on GPU (the heads are small, the features are f16 already); fp32 on CPU.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
