"""The training work folder: one checkpoint per stage, written atomically, read back with weights_only."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from refseg.core.errors import RunError


def save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole


def load(path: Path, config: dict) -> dict | None:
    """The checkpoint at `path` (None if there is none); refuses one whose settings differ from `config`
    (the settings its stage depends on: stage A can be reused by a stage B with other settings)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, still no code runs
    saved = {k: v for k, v in state.get("config", {}).items() if k in config}
    if saved != config:
        diff = sorted(k for k in config if config.get(k) != saved.get(k))
        raise RunError(f"{path} was written by a run with other settings ({', '.join(diff)}); "
                       "use the same settings or another --work folder")
    return state
