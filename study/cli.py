"""`refseg-report`: the whole noise-ablation study, with its table and figures, in one command (`demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from refseg.core.cli import user_errors


@click.group(help="Studies over the whole pipeline (the demo: the report's Table 4 noise ablation).")
def main():
    pass


@main.command(help="Synthetic data -> caches at each T -> heads -> ablation table and figures, under --out.")
@click.option("--out", default="demo-out", show_default=True, type=click.Path())
@click.option("--model", default="auto", show_default=True, help="auto = tiny-synth when shipped, else tiny.")
@click.option("--images", default=200, show_default=True)
@click.option("--image-size", default=128, show_default=True)
@click.option("--noise-t", "noise_ts", type=int, multiple=True, help="Noise levels (default 0, 5, 500).")
@click.option("--head", "heads", multiple=True, help="Heads to train (default vpd, film).")
@click.option("--epochs", default=12, show_default=True)
@click.option("--hidden", default=64, show_default=True, help="Head width (VPD: 640).")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="Torch CPU threads. 1 reproduces the table exactly; more run faster but round differently.")
@click.option("--quiet", is_flag=True)
@user_errors
def demo(out, model, images, image_size, noise_ts, heads, epochs, hidden, device, threads, quiet):
    from refseg.study.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, model=model, images=images, image_size=image_size, epochs=epochs, hidden=hidden,
                     device=device, threads=threads, progress=not quiet)
    if noise_ts:
        cfg.noise_ts = tuple(noise_ts)
    if heads:
        cfg.heads = tuple(heads)
    result = run_demo(cfg)
    click.echo(f"\nmodel: {result['model']}; timings (s): {json.dumps(cfg.timings)}")
    click.echo(f"wrote {', '.join(sorted(p.name for p in result['files'].values()))} under {Path(out)}")
