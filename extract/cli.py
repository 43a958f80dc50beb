"""`refseg-extract`: run the frozen backbone once and store what heads need."""

from __future__ import annotations

import os

import click
from refseg.core.cli import Resumable, fail, say, user_errors, warn
from refseg.core.options import dataclass_options
from refseg.extract.config import PRESETS, ExtractionConfig, with_preset

ON_INTERRUPT = Resumable("the shards written so far are kept in {out}")  # what Ctrl-C keeps

SIZE_NOTE = (
    "Disk: Stable Diffusion 1.5 at 512 px with 40 tokens stores about 4.8 MB per sample per noise level "
    "(float16 features s8..s64 + attention maps), i.e. about 24 GB per noise level for 5,000 samples; "
    "--limit, --sentences first and --strides bound it."
)


class ShardPart(click.ParamType):
    """`--shard i/n` -> (i, n); a bad value is one line on stderr and exit 2 (`fail`)."""

    name = "text"  # --help shows TEXT

    def convert(self, value, param, ctx) -> tuple[int, int]:
        try:
            i, n = (int(v) for v in value.split("/"))
        except ValueError:
            fail(f"--shard takes i/n, like 0/4 (got '{value}')")
        if not 0 <= i < n:
            fail(f"--shard i/n needs 0 <= i < n (got '{value}')")
        return i, n

    @staticmethod
    def to_text(value: tuple[int, int]) -> str:  # as typed (refseg.core.cli.command_line)
        return f"{value[0]}/{value[1]}"


def shard_from_environment() -> tuple[int, int]:
    """torchrun's RANK/WORLD_SIZE, else the whole store."""
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


@click.command(help="Extract multi-scale UNet features and cross-attention maps into a Zarr cache.\n\n" + SIZE_NOTE)
@dataclass_options(ExtractionConfig, skip=("shard", "progress"))
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="vpd: T=0, timestep 1, no latent scaling, 40 tokens, attention at strides 16 and 32.")
@click.option("--shard", type=ShardPart(), default=None,
              help="i/n: this process fills shards j with j % n == i (default under torchrun: RANK/WORLD_SIZE). "
                   "Processes given the same part share its shards.")
@click.pass_context
@user_errors  # adds --threads and --quiet
def main(ctx, preset, shard, quiet, **settings):
    # Imported here so that `--help` is instant and a bad flag fails before torch/diffusers load.
    from refseg.extract.pipeline import run_extraction
    from refseg.extract.plan import check_space, plan_before_loading

    explicit = {name for name in settings if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    settings["noise_ts"] = tuple(dict.fromkeys(settings["noise_ts"]))  # --noise-t 5 --noise-t 5: once
    cfg = ExtractionConfig(**settings, shard=shard or shard_from_environment(), progress=not quiet)
    cfg = with_preset(cfg, preset, explicit)
    # From the model's configs where they say its shapes: a store that cannot fit is refused, and a dry
    # run answered, before the weights load (None: run_extraction plans once the model is loaded)
    plan = plan_before_loading(cfg)
    if plan is not None and cfg.dry_run:
        for line in plan.lines():
            click.echo(line)
        return
    if plan is not None and not cfg.no_space_check:
        check_space(plan)
    report = run_extraction(cfg)
    if report.dataset_changed:
        warn(report.DATASET_CHANGED_NOTE)
    for line in report.lines():
        click.echo(line)
    if not cfg.dry_run:
        say(f"wrote {cfg.out}: `refseg-cache info {cfg.out}` says what it holds")
