"""VPD's text adapter: the UNet is conditioned on `c = l + gamma * MLP(l)`, not on CLIP's output `l`.

VPD (`vpd/models.py` `TextAdapterRefer`, `refer/models_refer/model.py`) trains an MLP (Linear, GELU,
Linear) and a per-channel scale `gamma` with the UNet. A backbone folder carries them as an optional
part, `text_adapter/` (`adapter.safetensors` + `config.json`), beside the diffusers components; a
folder without it loads as a plain diffusers folder (no adapter, nothing added to the identity).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from refseg.core.errors import ModelError

FOLDER = "text_adapter"
WEIGHTS = "adapter.safetensors"
CONFIG = "config.json"


class TextAdapter(nn.Module):
    """`forward(l) = l + gamma * fc(l)`, with `fc` = Linear(D, D), GELU, Linear(D, D) as VPD's."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, text_embedding: torch.Tensor) -> torch.Tensor:
        return text_embedding + self.gamma * self.fc(text_embedding)


def save_text_adapter(adapter: TextAdapter, backbone_folder) -> Path:
    # deferred: only a folder with a text adapter needs it
    from safetensors.torch import save_file

    folder = Path(backbone_folder) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"kind": "vpd", "dim": adapter.dim,
                                             "formula": "l + gamma * fc(l)"}, indent=2) + "\n")
    return folder


def load_text_adapter(backbone_folder) -> TextAdapter | None:
    """The folder's adapter, or None when it has none; a broken one is a `ModelError`."""
    folder = Path(backbone_folder) / FOLDER
    if not folder.exists():
        return None
    # deferred: only a folder with a text adapter needs it
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG).read_text())
        adapter = TextAdapter(int(config["dim"]))
        adapter.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot load the text adapter in {folder}: {first}") from None
    return adapter


def adapter_identity(adapter: TextAdapter) -> dict:
    """What the cache fingerprint records of an adapter: its kind, width and a sha256 of its weights."""
    h = hashlib.sha256()
    state = adapter.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"kind": "vpd", "dim": adapter.dim, "weights_sha256": h.hexdigest()}
