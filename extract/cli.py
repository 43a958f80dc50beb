"""`refseg-extract`: run the frozen backbone once and store what heads need."""

from __future__ import annotations

import os

import click

from refseg.core.cli import fail, user_errors

SIZE_NOTE = (
    "Disk: Stable Diffusion 1.5 at 512 px with 40 tokens stores about 4.8 MB per sample per noise level "
    "(float16 features s8..s64 + attention maps), i.e. about 24 GB per noise level for 5,000 samples; "
    "--limit, --sentences first and --strides bound it."
)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        fail(f"{flag} takes comma-separated integers like 8,16,32 (got '{text}')")
    if not values and flag == "--strides":
        fail("--strides needs at least one stride")
    return values


def _shard(text: str | None) -> tuple[int, int]:
    """`--shard i/n`, else torchrun's RANK/WORLD_SIZE, else the whole store."""
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        try:
            i, n = int(rank), int(world)
        except ValueError:
            fail(f"RANK and WORLD_SIZE must be integers (got RANK={rank!r}, WORLD_SIZE={world!r})")
        if not 0 <= i < n:
            fail(f"RANK must be in 0..WORLD_SIZE-1 (got RANK={rank}, WORLD_SIZE={world})")
        return i, n
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        fail(f"--shard takes i/n, like 0/4 (got '{text}')")
    if not 0 <= i < n:
        fail(f"--shard i/n needs 0 <= i < n (got '{text}')")
    return i, n


@click.command(help="Extract multi-scale UNet features and cross-attention maps into a Zarr cache.\n\n" + SIZE_NOTE)
@click.option("--data-root", required=True, type=click.Path(), help="Folder holding <dataset>/refs(<split-by>).p.")
@click.option("--dataset", required=True, help="refcoco, refcoco+, refcocog, refcoco-synth, ...")
@click.option("--split-by", default="unc", show_default=True)
@click.option("--split", required=True, help="train, val, testA, testB, test, ...")
@click.option("--image-root", type=click.Path(), default=None, help="Folder of the images (default: the refer layout).")
@click.option("--model", default="tiny", show_default=True,
              help="Hub id, local diffusers folder, single .safetensors/.ckpt file, 'tiny' or 'tiny-synth'.")
@click.option("--model-config", type=click.Path(), default=None, help="Diffusers config folder for a single-file model (offline).")
@click.option("--noise-t", "noise_ts", type=int, multiple=True, help="Noise level T (repeatable): 0, 5, 500 ...")
@click.option("--timestep", type=int, default=None, help="UNet timestep (default: T).")
@click.option("--latent-scaling", type=click.Choice(["sd", "none"]), default="sd", show_default=True)
@click.option("--noise-seed", type=int, default=0, show_default=True)
@click.option("--preset", type=click.Choice(["vpd"]), default=None,
              help="vpd: T=0, timestep 1, no latent scaling, 40 tokens, attention at strides 16 and 32.")
@click.option("--out", required=True, type=click.Path(), help="The cache store (CACHE.zarr).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: fp32 on CPU, bf16 on GPU.")
@click.option("--image-size", type=int, default=512, show_default=True)
@click.option("--token-length", type=int, default=40, show_default=True, help="40 for RefCOCO/+, 77 for RefCOCOg.")
@click.option("--limit", type=int, default=None, help="Only the first N samples (sorted by image).")
@click.option("--sentences", type=click.Choice(["all", "first"]), default="all", show_default=True)
@click.option("--strides", default="8,16,32,64", show_default=True, help="Feature strides to store.")
@click.option("--attn-strides", default="16,32", show_default=True, help="Cross-attention strides ('' for none).")
@click.option("--text-field", type=click.Choice(["sent", "raw"]), default="sent", show_default=True)
@click.option("--mask-rule", type=click.Choice(["vpd", "union"]), default="vpd", show_default=True)
@click.option("--shard-size", type=int, default=None, help="Samples per Zarr shard (the unit of writing).")
@click.option("--codec", type=click.Choice(["none", "zstd", "blosc"]), default="none", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader workers decoding images.")
@click.option("--shard", "shard_text", default=None,
              help="i/n: this process fills shards j with j % n == i (default under torchrun: RANK/WORLD_SIZE). "
                   "Processes given the same part share its shards.")
@click.option("--wait-timeout", type=float, default=3600.0, show_default=True,
              help="Seconds to wait for other processes' latents/embeddings before the UNet stage.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store with different settings (one with the same settings is resumed).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images / empty sentences, report them at the end.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@user_errors
def main(ctx, **opts):
    # Imported here so that `--help` is instant and a bad flag fails before torch/diffusers load.
    from refseg.extract.pipeline import ExtractionConfig, run_extraction, with_preset

    explicit = {k for k in opts if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    noise_ts = tuple(dict.fromkeys(opts["noise_ts"])) or (0,)
    cfg = ExtractionConfig(
        data_root=opts["data_root"], dataset=opts["dataset"], split=opts["split"], out=opts["out"],
        model=opts["model"], noise_ts=noise_ts, split_by=opts["split_by"], image_root=opts["image_root"],
        model_config=opts["model_config"], batch_size=opts["batch_size"], device=opts["device"], dtype=opts["dtype"],
        image_size=opts["image_size"], token_length=opts["token_length"], limit=opts["limit"],
        sentences=opts["sentences"], strides=_ints(opts["strides"], "--strides"),
        attn_strides=_ints(opts["attn_strides"], "--attn-strides"), timestep=opts["timestep"],
        latent_scaling=opts["latent_scaling"], noise_seed=opts["noise_seed"], text_field=opts["text_field"],
        mask_rule=opts["mask_rule"], shard_size=opts["shard_size"], codec=opts["codec"], workers=opts["workers"],
        shard=_shard(opts["shard_text"]), wait_timeout=opts["wait_timeout"], overwrite=opts["overwrite"],
        skip_bad=opts["skip_bad"],
        progress=not opts["quiet"],
    )
    cfg = with_preset(cfg, opts["preset"], explicit)
    report = run_extraction(cfg)
    for line in report.lines():
        click.echo(line)
