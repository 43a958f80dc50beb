"""The training work folder: one checkpoint per stage, written atomically, read back with weights_only."""

from __future__ import annotations

import os
import time
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


class StageCheckpoint:
    """One stage's resumable state in `path`: its modules and optimizer are restored when the
    checkpoint holds them, and saved with the step, the loss history and the seconds trained, every
    `every` seconds (`tick`) and at the end (`finish`). The training loop owns `step` and `history`."""

    def __init__(self, path: Path, config: dict, modules: dict, optimizer, title: str, total: int, log,
                 every: float):
        self.path, self.config, self.modules, self.optimizer, self.every = path, config, modules, optimizer, every
        state = load(path, config) or {"step": 0, "history": [], "seconds": 0.0}
        self.saved_step = None  # the step the file on disk holds weights of
        if all(name in state for name in modules):
            for name, module in modules.items():
                module.load_state_dict(state[name])
            optimizer.load_state_dict(state["optimizer"])
            self.saved_step = state["step"]
            log(f"{title}: resuming at step {state['step']}/{total}")
        self.step, self.history, self._seconds = state["step"], state["history"], state["seconds"]
        self.started = self._last_save = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since this process started the stage (the log's clock)."""
        return time.monotonic() - self.started

    def save(self) -> None:
        save(self.path, {"config": self.config, "step": self.step, "history": self.history,
                         "seconds": self._seconds + self.elapsed(), "optimizer": self.optimizer.state_dict(),
                         **{name: module.state_dict() for name, module in self.modules.items()}})
        self.saved_step, self._last_save = self.step, time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self._last_save > self.every:
            self.save()

    def finish(self) -> dict:
        """Save unless the file already holds this step's weights; -> the checkpoint as read back."""
        if self.saved_step != self.step:
            self.save()
        return load(self.path, self.config)
