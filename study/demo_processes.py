"""How the demo spends the CPU: extraction and the sweep as one-thread processes (`cpu_processes`),
extraction's parts spawned over the shards of each store, and the thread count of an extraction run
in this process (`extraction_threads`)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch

from refseg.backbones.loading import load_backbone
from refseg.cache import open_cache
from refseg.core.cli import default_threads, say
from refseg.core.device import resolve_device
from refseg.core.errors import CacheError
from refseg.core.processes import run_in_processes
from refseg.extract.config import ExtractionConfig
from refseg.extract.pipeline import run_extraction
from refseg.study.demo_config import DemoConfig


def run_extractions(cfg: DemoConfig, extractions: dict[str, ExtractionConfig], backbone) -> dict[str, Path]:
    """Every extraction of the study, as `cpu_processes` one-thread processes or in this process with
    `backbone`; -> cache name -> its store."""
    caches = {name: Path(extraction.out) for name, extraction in extractions.items()}
    processes = cpu_processes(cfg)
    if processes > 1:
        seconds = extract_in_processes(list(extractions.values()), processes)
        for (name, path), took in zip(caches.items(), seconds):
            say(f"{name}: {describe_store(path)}, {took:.0f} s by {processes} one-thread processes",
                enabled=cfg.progress)
    else:
        with extraction_threads(cfg.threads):
            for extraction in extractions.values():
                for line in run_extraction(extraction, backbone=backbone).lines():
                    say(line, enabled=cfg.progress)
    return caches


@contextmanager
def extraction_threads(threads: int | None):
    """Extraction runs on at most the usable cores less one: its cache-writer thread needs a core, and
    torch's OpenMP threads spin while one of them waits for it (docs/TROUBLESHOOTING.md). The sweep,
    with its caches preloaded, has no such thread and gets all `threads`."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads or before, default_threads()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_processes(cfg: DemoConfig) -> int:
    """On the CPU, extraction and the sweep run as `threads` one-thread processes. The tiny backbone and
    the demo's decoders are too small to keep two threads busy, and extraction runs on one thread beside
    its cache writer: on 2 cores two one-thread processes extract 1.55x and train 1.08-1.3x faster
    (BENCHMARKS.md, "Sweep" and the demo rows). The bytes are those of one thread, whatever the split,
    so every --threads gives the same caches and table on one CPU (tests/test_study.py)."""
    return (cfg.threads or 1) if resolve_device(cfg.device).type == "cpu" else 1


def extract_in_processes(extractions: list[ExtractionConfig], processes: int) -> list[float]:
    """Every extraction (split) by `processes` spawned one-thread processes, process i filling shard part
    (i, processes) of each store (extract/pipeline.py: the parts finish stage one together, then each
    runs the UNet on its own shards); -> each store's seconds (its slowest part). A store left
    incomplete (a part failed) is refused in one line; rerunning resumes it."""
    seconds_by_part = run_in_processes(_extract_part, [(extractions, (i, processes)) for i in range(processes)])
    for extraction in extractions:
        describe_store(extraction.out, require_complete=True)
    return [max(part_seconds) for part_seconds in zip(*seconds_by_part)]


def describe_store(path, require_complete: bool = False) -> str:
    """'600 samples, 107 images, T = 0, 5, 500 complete' for a demo cache."""
    cache = open_cache(path)
    levels = cache.noise_levels
    unfinished = [t for t in levels if not cache.done(t).all()]
    if require_complete and unfinished:
        raise CacheError(f"{path}: noise level(s) {', '.join(map(str, unfinished))} unfinished after extraction; "
                         "rerun the demo with the same --out to resume")
    state = "complete" if not unfinished else f"unfinished at T = {', '.join(map(str, unfinished))}"
    return f"{cache.n_samples} samples, {len(cache.images_done())} images, T = {', '.join(map(str, levels))} {state}"


def _extract_part(extractions: list[ExtractionConfig], part: tuple[int, int]) -> list[float]:
    """One spawned process's part of every split (its own backbone, one torch thread)."""
    torch.set_num_threads(1)
    first = extractions[0]
    backbone = load_backbone(first.model, device=first.device)
    seconds = []
    for extraction in extractions:
        only_part_0_shows_progress = extraction.progress and part[0] == 0
        report = run_extraction(dataclasses.replace(extraction, shard=part, progress=only_part_0_shows_progress),
                                backbone=backbone)
        seconds.append(report.seconds)
    return seconds
