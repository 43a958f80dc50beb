"""`refseg-sweep`: train every head of a grid, the heads of one noise level sharing each batch read."""

from __future__ import annotations

import click
from refseg.core.cli import current_runtime, say, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--cache", required=True, type=click.Path(), help="Training cache (CACHE.zarr).")
@click.option("--val-cache", required=True, type=click.Path(),
              help="Val cache: every head's metrics per epoch, its best epoch selected on oIoU.")
@click.option("--grid", "grid_path", required=True, type=click.Path(),
              help="GRID.yaml: refseg-train-head options in snake case; a list is a swept axis, a scalar fixed.")
@click.option("--out", required=True, type=click.Path(),
              help="Sweep directory: DIR/runs/<name>/, DIR/summary.csv, DIR/summary.md. Rerun to resume.")
@click.option("--data-seed", default=0, show_default=True, type=int,
              help="Seed of the data order shared by every head (each head's --seed seeds its init).")
@click.option("--processes", default=1, show_default=True, type=int,
              help="Local CPU processes that split the heads, each with threads/P torch threads (for long "
                   "sweeps of small heads; BENCHMARKS.md, Sweep); each head equals its solo run with --threads "
                   "threads/P.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (heads, passes, memory per head and pass) and write nothing.")
@user_errors
def main(cache, val_cache, grid_path, out, data_seed, processes, dry_run):
    """Train every combination of GRID in passes that fit in memory (one read of each batch feeds every
    head of a pass); each head gets a run directory refseg-eval reads, and the sweep a summary of mean and
    std over seeds per cell."""
    from refseg.heads.settings import SEED_RANGE, require_int
    from refseg.heads.sweep import SUMMARY_MD, load_grid, run_sweep

    require_int("--data-seed", data_seed, *SEED_RANGE)
    grid = load_grid(grid_path)
    rows = run_sweep(grid, cache, val_cache, out, data_seed=data_seed, progress=current_runtime().progress,
                     processes=processes, dry_run=dry_run)
    from pathlib import Path

    summary = Path(out) / SUMMARY_MD
    if rows and summary.is_file():
        click.echo(summary.read_text(), nl=False)
    from refseg.heads.distributed import Ranks

    if not dry_run and Ranks.from_env().main:  # (under torchrun, rank 0 writes the summary)
        say(f"wrote {summary}, {summary.with_suffix('.csv')} and a run directory per head under "
                    f"{Path(out) / 'runs'} (refseg-eval --run reads each)")


if __name__ == "__main__":
    main()
