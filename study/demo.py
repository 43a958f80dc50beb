"""The report's Table 4 study end to end: synthetic data -> caches at T = 0, 5, 500 -> heads -> table + figures.

    refseg-report demo --out demo-out

Everything lands under one folder:
    data/                  the synthetic RefCOCO-format dataset
    cache/{train,val}.zarr one store per split, a group per noise level (the backbone runs once per T)
    runs/<head>-t<T>/      one trained head per (head, T)
    ablation.md/.csv/.png  the noise-ablation table (val) and its plot
    curves.png noise_strip.png features.png overlays.png
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import click

from refseg.core.cli import cli

if TYPE_CHECKING:
    from refseg.extract.config import ExtractionConfig


@dataclass
class DemoConfig:
    """The study's settings; `refseg-report demo` has an option for each field with `cli` metadata."""

    out: str = field(default="demo-out", metadata=cli(type=click.Path()))
    model: str = field(default="auto", metadata=cli("auto = tiny-synth when shipped, else tiny."))
    images: int = field(default=200, metadata=cli())
    image_size: int = field(default=128, metadata=cli())
    token_length: int = 16  # the synthetic sentences are short; RefCOCO uses 40
    noise_ts: tuple[int, ...] = field(default=(0, 5, 500),
                                      metadata=cli("Noise levels.", flag="--noise-t", type=int, multiple=True))
    heads: tuple[str, ...] = field(default=("vpd", "film"),
                                   metadata=cli("Heads to train.", flag="--head", type=str, multiple=True))
    epochs: int = field(default=12, metadata=cli())
    hidden: int = field(default=64, metadata=cli("Head width (VPD: 640)."))  # 64 keeps the CPU demo in minutes
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    device: str = field(default="auto", metadata=cli())
    # CPU threads for torch. 1 makes the table reproducible: with 2 threads, GEMM reductions split
    # differently and the same study gave oIoU several points apart (BENCHMARKS.md, "Demo wall time").
    threads: int | None = field(default=1, metadata=cli(
        "Torch CPU threads. 1 reproduces the table exactly; more run faster but round differently."))
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a setting the study cannot use before anything is written under --out (one line)."""
        from refseg.core.errors import RefsegError
        from refseg.heads.registry import HEADS, head_names

        for flag, value, low in (("--images", self.images, 1), ("--image-size", self.image_size, 32),
                                 ("--epochs", self.epochs, 1), ("--hidden", self.hidden, 1),
                                 ("--threads", self.threads, 1)):
            if value is not None and value < low:
                raise RefsegError(f"{flag} must be at least {low} (got {value})")
        if not self.heads or any(h not in HEADS for h in self.heads):
            raise RefsegError(f"--head takes {', '.join(head_names())} (got {', '.join(self.heads) or 'none'})")
        if not self.noise_ts:
            raise RefsegError("--noise-t needs at least one noise level")

    def extraction(self, split: str, model: str) -> ExtractionConfig:
        """The extraction of one split of the study's data."""
        from refseg.extract.config import ExtractionConfig

        out = Path(self.out)
        return ExtractionConfig(data_root=str(out / "data"), dataset="refcoco-synth", split=split,
                                out=str(out / "cache" / f"{split}.zarr"), model=model, noise_ts=self.noise_ts,
                                image_size=self.image_size, token_length=self.token_length,
                                batch_size=self.batch_size, device=self.device, progress=self.progress)


# The fields without a command-line option (`refseg-report demo` has --quiet for `progress`).
NOT_OPTIONS = ("token_length", "batch_size", "lr", "optimizer", "seed", "progress", "timings")


def resolve_model(model: str) -> str:
    if model != "auto":
        return model
    from refseg.backbones.loading import TINY_SYNTH_DIR

    return "tiny-synth" if (TINY_SYNTH_DIR / "model_index.json").exists() else "tiny"


def say(cfg: DemoConfig, message: str) -> None:
    if cfg.progress:
        click.echo(message, err=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole study; returns {"results": [{"head", "noise_t", "summary", "run"}], "files": {...}}."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig) -> dict:
    from refseg.extract.pipeline import run_extraction
    from refseg.heads import evaluate, train
    from refseg.backbones.loading import load_backbone
    from refseg.core.paths import check_output_path
    from refseg.core.synthetic import generate

    # every setting is checked before anything is written under --out
    cfg.check()
    check_output_path(cfg.out, "the study's folder")
    out = Path(cfg.out)
    model = resolve_model(cfg.model)
    backbone = load_backbone(model, device=cfg.device)
    extractions = {split: cfg.extraction(split, model) for split in ("train", "val")}
    for extraction in extractions.values():
        extraction.check()
        extraction.check_for_model(backbone.max_stride, backbone.max_token_length, backbone.schedule_steps)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        cfg.timings[name] = round(now - clock, 1)
        clock = now

    say(cfg, f"[1/4] synthetic dataset ({cfg.images} images) -> {out / 'data'}")
    generate(out / "data", images=cfg.images, seed=cfg.seed, image_size=cfg.image_size)
    lap("data")

    say(cfg, f"[2/4] extraction with --model {model} at T = {', '.join(map(str, cfg.noise_ts))}")
    caches = {}
    for split, extraction in extractions.items():
        caches[split] = Path(extraction.out)
        report = run_extraction(extraction, backbone=backbone)
        say(cfg, "\n".join(report.lines()))
    lap("extract")

    say(cfg, f"[3/4] training heads {', '.join(cfg.heads)} per noise level ({cfg.epochs} epochs each)")
    results = []
    for head in cfg.heads:
        for t in cfg.noise_ts:
            run = out / "runs" / f"{head}-t{t}"
            train(caches["train"], t, head, run, val_cache=caches["val"], epochs=cfg.epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed, device=cfg.device,
                  hidden=cfg.hidden, progress=cfg.progress, resume=(run / "config.json").exists(),
                  preload=True)  # the demo's caches fit in RAM: epochs read from memory (BENCHMARKS.md, "Demo wall time")
            summary = evaluate(run, caches["val"], json_out=run / "eval_val.json", per_sample=run / "val.csv",
                               device=cfg.device)
            results.append({"head": head, "noise_t": t, "summary": summary, "run": str(run)})
    lap("train+eval")

    say(cfg, "[4/4] table and figures")
    files = write_report(out, results, caches["val"], backbone, cfg)
    lap("figures")
    import torch

    (out / "results.json").write_text(json.dumps(
        {"model": model, "results": results, "timings_s": cfg.timings, "torch_threads": torch.get_num_threads()},
        indent=2, sort_keys=True))
    return {"results": results, "files": files, "model": model}


def write_report(out: Path, results: list[dict], val_cache_path: Path, backbone, cfg: DemoConfig) -> dict:
    from refseg.cache import open_cache
    from refseg.heads.evaluate import predict
    from refseg.core.refer import ReferDataset
    from refseg.study import figures

    cache = open_cache(val_cache_path)
    refer = ReferDataset(str(out / "data"), "refcoco-synth")
    files = {}
    table = figures.ablation_markdown(results)
    files["ablation.md"] = out / "ablation.md"
    files["ablation.md"].write_text(f"# Noise ablation on refcoco-synth val\n\n{table}")
    files["ablation.csv"] = figures.write_ablation_csv(results, out / "ablation.csv")
    files["ablation.png"] = figures.plot_ablation(results, out / "ablation.png")
    files["curves.png"] = figures.plot_curves({f"{r['head']} T={r['noise_t']}": Path(r["run"]) for r in results},
                                              out / "curves.png")

    # The best run (by val oIoU) supplies the overlays; its noise level the feature view.
    best = max(results, key=lambda r: r["summary"]["oIoU"])
    with open(Path(best["run"]) / "val.csv") as f:
        ious = {int(rec["sent_id"]): float(rec["iou"]) for rec in csv.DictReader(f)}
    records = [dict(p, iou=ious[p["sent_id"]]) for p in predict(best["run"], cache, device=cfg.device)]
    files["overlays.png"] = figures.overlay_grid(records, cache, refer.image_path, out / "overlays.png")

    row = 0
    image_path = refer.image_path(int(cache.index["image_id"][row]))
    files["noise_strip.png"] = figures.noise_strip(backbone, cache, row, cfg.noise_ts, image_path,
                                                   out / "noise_strip.png")
    ids = cache.input_ids([row])[0]
    tokens = [tok.replace("</w>", "") for tok in backbone.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
    files["features.png"] = figures.feature_view(cache, best["noise_t"], row, tokens, out / "features.png")
    click.echo(table)
    return files
