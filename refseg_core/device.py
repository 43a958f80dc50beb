"""`--device` for every command: `auto` (CUDA when there is one, else the CPU), `cpu`, `cuda`, `cuda:N`.

One function for extraction, the heads and the benchmarks, so a device that cannot be used is
refused the same way everywhere: one `ModelError` line (exit 2), never a torch traceback.
"""

from __future__ import annotations

import torch

from refseg.core.errors import ModelError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None) -> cuda if available else cpu; a name or torch.device -> that device, checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device} was asked for, but CUDA is not available on this machine "
                         "(use --device cpu or auto)")
    return resolved
