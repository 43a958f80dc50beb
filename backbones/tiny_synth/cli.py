"""`python -m refseg.backbones.tiny_synth train|sample`."""

from __future__ import annotations

import sys

import click
import torch

from refseg.core.cli import user_errors
from refseg.core.options import dataclass_options
from refseg.backbones.tiny_synth.config import TrainConfig
from refseg.backbones.tiny_synth.train_ground import GroundConfig


@click.group()
def main():
    """Train the tiny-synth backbone on the synthetic world, or draw samples from one."""


@main.command()
@click.option("--work", required=True, type=click.Path(file_okay=False), help="checkpoints and logs (resumable)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="write the diffusers folder here")
@click.option("--resume", is_flag=True, help="continue the run in --work from its checkpoints")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads (bytes depend on it)")
@click.option("--checkpoint-seconds", type=float, default=180.0, show_default=True)
@dataclass_options(TrainConfig)
@user_errors
def train(work, out, resume, threads, checkpoint_seconds, **settings):
    """Train stage A (VAE) then stage B (UNet + text encoder), deterministically from --seed."""
    from refseg.backbones.tiny_synth.train import train as run  # deferred: diffusers is heavy, --help is fast

    torch.set_num_threads(threads)
    cfg = TrainConfig(**settings)
    run(cfg, work, out, resume=resume, checkpoint_seconds=checkpoint_seconds,
        log=lambda m: (click.echo(m), sys.stdout.flush()))


@main.command()
@click.option("--base", required=True, type=click.Path(file_okay=False, exists=True),
              help="the stage-A/B model to start from (a diffusers folder)")
@click.option("--work", required=True, type=click.Path(file_okay=False), help="checkpoints and logs (resumable)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="write the diffusers folder here")
@click.option("--resume", is_flag=True, help="continue the run in --work from its checkpoint")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads (bytes depend on it)")
@click.option("--checkpoint-seconds", type=float, default=180.0, show_default=True)
@dataclass_options(GroundConfig)
@user_errors
def ground(base, work, out, resume, threads, checkpoint_seconds, **settings):
    """Stage C: fine-tune the UNet and text encoder so cross-attention looks at the named object."""
    from refseg.backbones.tiny_synth.ground import ground as run  # deferred: diffusers is heavy, --help is fast

    torch.set_num_threads(threads)
    run(GroundConfig(**settings), base, work, out, resume=resume, checkpoint_seconds=checkpoint_seconds,
        log=lambda m: (click.echo(m), sys.stdout.flush()))


@main.command()
@click.option("--model", default="tiny-synth", show_default=True, help="a diffusers folder, or tiny-synth")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write")
@click.option("--count", type=int, default=12, show_default=True, help="captions (rows of the grid)")
@click.option("--steps", type=int, default=40, show_default=True, help="DDIM steps")
@click.option("--guidance", type=float, default=4.0, show_default=True, help="classifier-free guidance scale")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@user_errors
def sample(model, out, count, steps, guidance, seed, threads):
    """A grid: real synthetic scenes (left) and samples for their captions."""
    from refseg.backbones.tiny_synth.sample import write_grid  # deferred: diffusers is heavy, --help is fast

    torch.set_num_threads(threads)
    path = write_grid(model, out, count=count, steps=steps, guidance=guidance, seed=seed)
    click.echo(f"wrote {path}")
