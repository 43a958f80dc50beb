"""Feeding a head, the same way in training, evaluation and the benchmarks: the DataLoader over a
cache's samples, a batch moved to the device, the autocast policy, and the text-blind baseline's
removal of the sentence."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from refseg.cache.dataset import CollatedItems


def collate_items(items):
    """The batch FeatureDataset read whole (`CollatedItems.batch`) as it is; other items stacked as torch's
    `default_collate` does."""
    return items.batch if isinstance(items, CollatedItems) else default_collate(items)


def make_loader(dataset, batch_size: int | None, device: torch.device, *, sampler=None, batch_sampler=None,
                workers: int = 0) -> DataLoader:
    if batch_sampler is not None:  # it makes the batches: DataLoader takes no batch_size then
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_items,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate_items, pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def batch_to_device(batch: dict, device: torch.device, non_blocking: bool = False):
    """-> (features {name: float32}, text_embedding float32 or None, text_mask bool or None) on `device`."""
    features = {k: v.to(device, non_blocking=non_blocking).float() for k, v in batch["features"].items()}
    text = batch.get("text_embedding")
    mask = batch.get("text_mask")
    if text is not None:
        text = text.to(device, non_blocking=non_blocking).float()
        mask = mask.to(device, non_blocking=non_blocking).bool()
    return features, text, mask


def autocast(device: torch.device, head_dtype: str = "auto"):
    """auto: bf16 autocast on GPU (the heads are small, the features are f16 already), fp32 on CPU;
    fp32: fp32 everywhere (on a GPU a bf16 head flips pixels whose logit margin is below ~1e-2)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and head_dtype != "fp32")


# ---- the text-blind baseline ----------------------------------------------------------------------
# "The same head with the sentence removed" (`--text-blind`). The head keeps its architecture and its
# weights' names; what it is given instead of the sentence is the same for every sample: a zero
# embedding with every token marked valid. Not an all-False mask: that would leave a head that
# attends over tokens nothing to attend to (a softmax of -inf), and a length-dependent mask would leak
# the sentence's length. The cross-attention maps (attn_s*) are the sentence's too: a text-blind head
# reads no attention maps (train_setup). The UNet features were still computed with the sentence as
# cross-attention context: it is the head that is blind, not the features.
TEXT_BLIND_HOOK = "_refseg_text_blind"


def remove_sentence(model: torch.nn.Module, spec) -> torch.nn.Module:
    """Make `model` text-blind in place (a forward pre-hook: its state_dict is unchanged); -> model.

    Whatever sentence a caller passes is replaced, so training, validation, `refseg-eval` and
    `predict` agree once each applies this to the run's head (config.json: "text_blind": true).
    """
    if getattr(model, TEXT_BLIND_HOOK, False) or not getattr(model, "uses_text", False):
        return model  # a head that never reads the sentence is text-blind already

    def blind(module, args, kwargs):
        features = args[0] if args else kwargs["features"]
        any_map = next(iter(features.values()))
        size = (any_map.shape[0], spec.token_length)
        text = torch.zeros(*size, spec.text_dim, device=any_map.device)
        mask = torch.ones(size, dtype=torch.bool, device=any_map.device)
        return (features, text, mask), {}

    model.register_forward_pre_hook(blind, with_kwargs=True)
    setattr(model, TEXT_BLIND_HOOK, True)
    return model
