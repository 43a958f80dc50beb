"""`refseg-predict`: masks for your own images and sentences with a backbone and a head run, no cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from refseg.core.cli import fail, say, user_errors
from refseg.core.options import cli, dataclass_options


@dataclass(kw_only=True)
class PredictSettings:
    model: str = field(metadata=cli("Backbone: hub id, local diffusers folder, single file, 'tiny' or 'tiny-synth'."))
    model_config: str | None = field(default=None, metadata=cli(
        "Diffusers config folder for a single-file model (offline).", type=click.Path()))
    run: str = field(metadata=cli("Head run directory (refseg-train-head or refseg-import).", type=click.Path()))
    images: tuple[str, ...] = field(default=(), metadata=cli(
        "Image (repeatable; paired in order with --text).", flag="--image", type=click.Path(), multiple=True,
        show_default=False))
    texts: tuple[str, ...] = field(default=(), metadata=cli(
        "Sentence referring to an object (repeatable).", flag="--text", multiple=True, show_default=False))
    pairs: str | None = field(default=None, metadata=cli(
        "CSV of image,text rows (added after the --image/--text pairs).", type=click.Path()))
    out: str = field(default="predictions", metadata=cli(
        "Folder for NNN_mask.png (0/255, original size), NNN_overlay.png and predictions.json.",
        type=click.Path()))
    checkpoint: str = field(default="best", metadata=cli("best or last.", type=click.Choice(["best", "last"])))
    device: str = field(default="auto", metadata=cli("auto, cpu, cuda, cuda:1 ..."))
    dtype: str = field(default="auto", metadata=cli("auto: fp32 on CPU, bf16 on GPU.",
                                                    type=click.Choice(["auto", "fp32", "bf16", "fp16"])))
    batch_size: int = 4


@click.command(help="Predict the mask of the object each sentence refers to in its image, at the run's "
                    "extraction settings (the same masks as refseg-extract + refseg-eval would give).")
@dataclass_options(PredictSettings)
@user_errors
def main(**options):
    s = PredictSettings(**options)
    if len(s.images) != len(s.texts):
        fail(f"give one --text per --image (got {len(s.images)} images and {len(s.texts)} texts)")
    if not s.images and not s.pairs:
        fail("nothing to predict: give --image and --text, or --pairs CSV")
    # deferred: the prediction imports torch and the backbones, and --help must be fast
    from refseg.study.predict import load_run, predict_loaded, read_pairs_csv, settings_record, write_predictions

    pairs = list(zip(s.images, s.texts)) + (read_pairs_csv(s.pairs) if s.pairs else [])
    loaded = load_run(s.model, s.run, model_config=s.model_config, device=s.device, dtype=s.dtype,
                      checkpoint=s.checkpoint)
    predictions = predict_loaded(loaded, pairs, batch_size=s.batch_size)
    path = write_predictions(predictions, s.out, settings_record(loaded, s.model, s.run))
    for p in predictions:
        click.echo(f"{p.image}: {p.text!r} -> {int(p.mask_original.sum())} px")
    say(f"wrote {path}")
