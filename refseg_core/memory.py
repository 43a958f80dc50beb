"""How much RAM is free: for `--preload`, which says what it needs and refuses what does not fit."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable), or None where it cannot be known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
