"""`refseg-train-head`: train a head on one noise level of a feature cache."""

from __future__ import annotations

import json

import click

from refseg.heads.registry import head_names
from refseg.core.cli import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--cache", "cache_path", required=True, type=click.Path(), help="Training cache (CACHE.zarr).")
@click.option("--noise-t", required=True, type=int, help="Noise level T to train on (a group of the cache).")
@click.option("--head", required=True, type=click.Choice(head_names()), help="Head to train.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (new or empty, or with --resume).")
@click.option("--val-cache", type=click.Path(), default=None,
              help="Val cache: metrics every epoch and best.safetensors selected on its oIoU (as VPD/LAVT).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Samples per optimizer step (under torchrun: in all, split across the ranks).")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 5e-5 adamw, 1e-4 adam].")
@click.option("--optimizer", type=click.Choice(["adamw", "adam"]), default="adamw", show_default=True,
              help="adamw: wd 1e-2 + poly decay per iteration (VPD); adam: constant lr.")
@click.option("--loss", type=click.Choice(["ce", "ce+dice"]), default="ce", show_default=True,
              help="Cross-entropy with class weights [0.9, 1.1] (VPD), optionally plus Dice.")
@click.option("--hidden", type=int, default=640, show_default=True, help="Decoder width of vpd/film.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--preload/--no-preload", default=None,
              help="Load the samples into RAM first (checked to fit). Default: when they take under half the free RAM.")
@click.option("--resume", is_flag=True, help="Continue RUN from its last completed epoch.")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Validate every N epochs (and last).")
@click.option("--max-samples", type=int, default=None, help="Train on the first N finished samples only.")
@user_errors
def main(cache_path, noise_t, head, out, val_cache, epochs, batch_size, lr, optimizer, loss, hidden, seed, device,
         workers, preload, resume, eval_every, max_samples):
    """Train a head on cached features of one noise level; writes RUN/{head,best,state}.safetensors,
    config.json and metrics.jsonl."""
    from refseg.heads.distributed import Ranks
    from refseg.heads.train import train

    summary = train(cache_path, noise_t, head, out, val_cache=val_cache, epochs=epochs, batch_size=batch_size, lr=lr,
                    optimizer=optimizer, loss=loss, seed=seed, device=device, workers=workers,
                    preload="auto" if preload is None else preload,
                    resume=resume, hidden=hidden, eval_every=eval_every, max_samples=max_samples, progress=True)
    if not Ranks.from_env().main:  # under torchrun, rank 0 reports
        return
    if summary.get("val"):
        from refseg.core.metrics import format_table

        click.echo(format_table([(f"T={noise_t} (val, last epoch)", summary["val"])]))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "val"}))


if __name__ == "__main__":
    main()
