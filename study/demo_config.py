"""The demo's settings (`DemoConfig`): `refseg-report demo` has an option for each field with `cli`
metadata, and the extractions and the sweep's grid the study runs are made from them.

Light to import (no torch): `refseg-report --help` builds its options from this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from refseg.core.options import cli
from refseg.core.errors import RefsegError
from refseg.extract.config import ExtractionConfig

BASELINES = ("best", "all", "none")
SPLITS = ("train", "val")


@dataclass
class DemoConfig:
    """The study's settings; `refseg-report demo` has an option for each field with `cli` metadata."""

    out: str = field(default="demo-out", metadata=cli(type=click.Path()))
    model: str = field(default="auto", metadata=cli("auto = tiny-synth when shipped, else tiny."))
    # 600 images give 335 val sentences. Measured 2026-11-26 (BENCHMARKS.md, demo rows): one run's oIoU
    # has a sampling std of ~1.2 points there (bootstrap), above the seeds' spread (~0.5), so the val
    # size dominates an absolute number; the seeds dominating would take ~6x the val sentences, beyond
    # the 10-minute budget. Comparisons are paired on the same sentences (sampling std of a difference
    # ~0.9) and `verdict` counts both. Training data over seeds: every train sentence of the 600 images
    # (2,370) with 2 seeds lifts the best cell from 30.1 / 30.6 (oIoU / mIoU; 600 sentences, 3 seeds) to
    # 34.8 / 36.4, above every object's 27.2 / 31.2 by more than 5 on both, in 4:54 of study on 2 cores
    # (BENCHMARKS.md, "Levers on the demo"); the seeds' spread (~0.5) stays under the val sampling's.
    # With tiny-synth's second grounding run (issue 26) the best cell is 41.5 / 44.5, P@0.5 44.3, in 4:48.
    images: int = field(default=600, metadata=cli("Synthetic images (70% train, 10% val by image)."))
    train_samples: int | None = field(default=2400, metadata=cli(
        "Extract and train on the first N train sentences only (the val split is used whole)."))
    image_size: int = field(default=128, metadata=cli())
    token_length: int = 16  # the synthetic sentences are short; RefCOCO uses 40
    noise_ts: tuple[int, ...] = field(default=(0, 5, 500),
                                      metadata=cli("Noise levels.", flag="--noise-t", type=int, multiple=True))
    heads: tuple[str, ...] = field(default=("vpd", "film"),
                                   metadata=cli("Heads to train.", flag="--head", type=str, multiple=True))
    seeds: int = field(default=2, metadata=cli("Seeds (head initialisations) per (head, T)."))
    baseline: str = field(default="best", metadata=cli(
        "Text-blind baseline for the best head, for every head, or none.", type=click.Choice(BASELINES)))
    epochs: int = field(default=6, metadata=cli())
    # 32: the decoders' convolutions are most of the sweep's time, and 32 channels train twice as fast as
    # 64 with the same val oIoU on this world (BENCHMARKS.md, demo rows); VPD uses 640
    hidden: int = field(default=32, metadata=cli("Head width (VPD: 640)."))
    cache_dtype: str = field(default="fp16", metadata=cli(
        "Storage type of the study's caches (refseg-extract --cache-dtype).",
        type=click.Choice(["fp16", "fp32", "int8"])))
    loss: str = "ce+dice"  # Dice helps the small objects of the synthetic world (issue 13)
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0  # the dataset's seed and the sweep's data order
    device: str = field(default="auto", metadata=cli())
    # Across CPUs the conclusions, not the digits, hold: another CPU rounds differently (BENCHMARKS.md,
    # demo rows); the seeds' spread is much larger than that. On one CPU every --threads gives the same
    # bytes: each process computes on one thread (`demo_processes.cpu_processes`).
    threads: int | None = field(default=2, metadata=cli(
        "CPU threads: extraction and the sweep run as that many one-thread processes, so every count gives the "
        "same caches and table on one CPU."))
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a setting the study cannot use before anything is written under --out (one line): the
        study's own settings, then what each of its extractions checks (`ExtractionConfig.check`)."""
        # deferred: the heads' registry imports torch, and --help must be fast
        from refseg.heads.registry import HEADS, head_names

        for flag, value, low in (("--images", self.images, 1), ("--image-size", self.image_size, 32),
                                 ("--epochs", self.epochs, 1), ("--hidden", self.hidden, 1),
                                 ("--threads", self.threads, 1), ("--seeds", self.seeds, 1),
                                 ("--train-samples", self.train_samples, 1)):
            if value is not None and value < low:
                raise RefsegError(f"{flag} must be at least {low} (got {value})")
        if not self.heads or any(h not in HEADS for h in self.heads):
            raise RefsegError(f"--head takes {', '.join(head_names())} (got {', '.join(self.heads) or 'none'})")
        if not self.noise_ts:  # ExtractionConfig reads no levels as T = 0; the study needs them given
            raise RefsegError("--noise-t needs at least one noise level")
        if self.baseline not in BASELINES:
            raise RefsegError(f"--baseline takes {', '.join(BASELINES)} (got {self.baseline!r})")
        for extraction in self.extractions(self.model).values():
            extraction.check()

    def extractions(self, model: str) -> dict[str, ExtractionConfig]:
        """Every extraction the study runs, by cache name: train and val, and with a baseline their
        no-sentence twins (the empty prompt: one denoiser run per image)."""
        extractions = {split: self.extraction(split, model) for split in SPLITS}
        if self.baseline != "none":
            extractions.update({f"{split}-no-sentence": self.extraction(split, model, prompt="empty")
                                for split in SPLITS})
        return extractions

    def extraction(self, split: str, model: str, prompt: str = "sentence") -> ExtractionConfig:
        """The extraction of one split of the study's data; `prompt="empty"`: the no-sentence baseline's."""
        out = Path(self.out)
        name = split if prompt == "sentence" else f"{split}-no-sentence"
        return ExtractionConfig(data_root=str(out / "data"), dataset="refcoco-synth", split=split, prompt=prompt,
                                cache_dtype=self.cache_dtype,
                                out=str(out / "cache" / f"{name}.zarr"), model=model, noise_ts=self.noise_ts,
                                image_size=self.image_size, token_length=self.token_length,
                                batch_size=self.batch_size, device=self.device, progress=self.progress,
                                limit=self.train_samples if split == "train" else None)

    def grid(self, heads, text_blind: bool) -> dict:
        """The sweep's grid: every (head, T, seed), the rest fixed."""
        return {"head": list(heads), "noise_t": list(self.noise_ts), "seed": list(range(self.seeds)),
                "text_blind": text_blind, "hidden": self.hidden, "epochs": self.epochs, "lr": self.lr,
                "optimizer": self.optimizer, "loss": self.loss, "batch_size": self.batch_size,
                "device": self.device, "preload": True}  # the demo's caches fit in RAM


# The fields without a command-line option (`refseg-report demo` has --quiet for `progress`).
NOT_OPTIONS = ("token_length", "loss", "batch_size", "lr", "optimizer", "seed", "progress", "timings")


def resolve_model(model: str) -> str:
    """--model auto: the shipped tiny-synth backbone when its files are there, else tiny (random weights)."""
    if model != "auto":
        return model
    # deferred: backbones.loading imports torch, and this module stays light for --help
    from refseg.backbones.loading import TINY_SYNTH_DIR

    return "tiny-synth" if (TINY_SYNTH_DIR / "model_index.json").exists() else "tiny"
