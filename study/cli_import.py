"""`refseg-import vpd CKPT --base-model MODEL --out DIR`: VPD's released checkpoint -> DIR/model (a
backbone for --model) and DIR/run (a head run for --run). See refseg.study.vpd_run."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from refseg.core.cli import user_errors
from refseg.core.options import cli, dataclass_options


@dataclass(kw_only=True)
class ImportSettings:
    """`refseg-import vpd`'s options (the checkpoint is the argument)."""

    base_model: str = field(metadata=cli(
        "The model VPD was trained from, in any --model form: it supplies the text encoder, tokenizer, "
        "scheduler and VAE decoder."))
    model_config: str | None = field(default=None, metadata=cli(
        "Diffusers config folder when --base-model is a single file (offline).", type=click.Path()))
    out: str = field(metadata=cli("New folder: OUT/model and OUT/run are written.", type=click.Path()))
    image_size: int | None = field(default=None, metadata=cli(
        "Image size when the checkpoint's args lack img_size [default: 512]."))
    token_length: int | None = field(default=None, metadata=cli(
        "Token length when the checkpoint's args lack token_length [default: 40]."))
    dtype: str = field(default="fp32", metadata=cli(
        "Precision the cache will be extracted in (refseg-extract --dtype; the run records it).",
        type=click.Choice(["fp32", "bf16", "fp16"])))


@click.group(help="Import a model trained elsewhere as a refseg backbone and head run.")
def main():
    pass


@main.command("vpd", help="VPD's referring-segmentation checkpoint (refer/train.py's .pth) -> OUT/model + OUT/run. "
                          "The file is read without running code: tensors and plain data only.")
@click.argument("checkpoint", type=click.Path())
@dataclass_options(ImportSettings)
@user_errors
def vpd(checkpoint, **options):
    from refseg.study.vpd_run import import_vpd  # torch/diffusers only once the options are valid

    result = import_vpd(checkpoint, **options)
    click.echo(result.table())
    click.echo(f"\nbackbone: {result.model}   (refseg-extract --model {result.model} --preset vpd "
               f"--image-size {result.image_size} --token-length {result.token_length})")
    click.echo(f"head run: {result.run}   (refseg-eval --run {result.run} --cache CACHE)")
