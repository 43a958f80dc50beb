"""`refseg-import vpd`: VPD's checkpoint -> `OUT/model/` (a backbone for `--model`) and `OUT/run/` (a
head run for `--run`).

The backbone half is `refseg.backbones.vpd_import`. The run half lives here, in the layer above
extraction and heads, because a run directory records the cache settings it fits: the backbone's
identity and the extraction settings (`refseg.extract.resolve.ResolvedExtraction.extraction_record`)
that `refseg-extract --model OUT/model --preset vpd` will produce, so that `refseg-eval --run OUT/run`
accepts that cache and refuses any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import refseg.core
from refseg.backbones.loading import load_backbone
from refseg.backbones.vpd_import import write_vpd_backbone
from refseg.core.errors import ModelError, RunError
from refseg.extract.config import PRESETS, ExtractionConfig
from refseg.extract.resolve import resolve_extraction
from refseg.heads import run_dir
from refseg.heads.registry import build_head

DEFAULT_IMAGE_SIZE, DEFAULT_TOKEN_LENGTH = 512, 40


@dataclass
class ImportResult:
    model: Path  # the backbone folder
    run: Path  # the head run directory
    image_size: int
    token_length: int
    rows: list  # (part, parameters, taken from)

    def table(self) -> str:
        lines = ["| part | parameters | taken from |", "| --- | ---: | --- |"]
        lines += [f"| {part} | {n:,} | {source} |" for part, n, source in self.rows]
        return "\n".join(lines)


def import_vpd(checkpoint, base_model: str, out, *, image_size: int | None = None, token_length: int | None = None,
               model_config: str | None = None, dtype: str = "fp32") -> ImportResult:
    """Import VPD's `checkpoint` with `base_model` supplying what it lacks, into `out/model` and `out/run`.

    The image size and token length are the checkpoint's saved `args` (img_size, token_length) when
    present, else `image_size` / `token_length` (default 512 / 40). `dtype` is the precision the
    cache will be extracted in (`refseg-extract --dtype`; auto is fp32 on CPU, bf16 on GPU): the run
    records the backbone identity and extraction settings of that precision.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} already exists and is not empty: choose a new --out")
    ck, rows = write_vpd_backbone(checkpoint, base_model, out / "model", model_config=model_config)
    size = int(ck.args.get("img_size") or image_size or DEFAULT_IMAGE_SIZE)
    tokens = int(ck.args.get("token_length") or token_length or DEFAULT_TOKEN_LENGTH)
    backbone = load_backbone(str(out / "model"), device="cpu", dtype=dtype)  # as refseg-extract will see it
    cfg = vpd_extraction_config(str(out / "model"), size, tokens, dtype)
    spec = backbone.spec(cfg.image_size, cfg.token_length, cfg.strides, cfg.attn_strides)
    head = build_head("vpd", spec, hidden=ck.head_hidden)
    try:
        head.load_state_dict(ck.head, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"the checkpoint's classifier does not fit refseg's vpd head at image size {size} with "
                         f"{tokens} tokens: {run_dir.first_mismatch(exc)}") from None
    _write_run(out / "run", head, spec, resolve_extraction(cfg, backbone).extraction_record, checkpoint, base_model)
    rows = rows + [("vpd head (SimpleDecoding)", sum(p.numel() for p in head.parameters()),
                    "checkpoint: classifier.*"),
                   ("skipped", 0, "not read: " + (", ".join(ck.skipped) or "nothing"))]
    return ImportResult(out / "model", out / "run", size, tokens, rows)


def vpd_extraction_config(model: str, image_size: int, token_length: int, dtype: str) -> ExtractionConfig:
    """The settings `refseg-extract --model MODEL --preset vpd --image-size S` uses (data fields unused)."""
    preset = dict(PRESETS["vpd"], token_length=token_length)
    return ExtractionConfig(data_root=".", dataset="-", split="-", out="-", model=model, image_size=image_size,
                            device="cpu", dtype=dtype, **preset)


def _write_run(run: Path, head, spec, settings: dict, checkpoint, base_model: str) -> None:
    """config.json with the keys `refseg-eval --run` reads (as heads/train_setup.py writes them), and
    head.safetensors; no best.safetensors (`--checkpoint best` falls back to it)."""
    run.mkdir(parents=True, exist_ok=True)  # import_vpd checked that OUT was new or empty
    settings = {"backbone": settings["backbone"], "extraction": settings["extraction"], "dataset": None}
    config = {
        "head": "vpd", "head_args": head.head_args, "spec": spec.select(head.tensor_names).to_dict(),
        "noise_t": 0, "timestep": 1,
        "cache": {"path": None, "fingerprint": None, "settings": settings, "samples": 0},
        "val_cache": None, "imported_from": {"format": "vpd", "checkpoint": str(Path(checkpoint).resolve()),
                                             "base_model": base_model},
        "parameters": sum(p.numel() for p in head.parameters()),
        "versions": {"torch": torch.__version__, "refseg": refseg.core.__version__},
    }
    run_dir.save_weights(run / run_dir.HEAD, head.state_dict())
    run_dir.write_json(run / run_dir.CONFIG, config)

