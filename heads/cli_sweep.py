"""`refseg-sweep`: train every head of a grid, the heads of one noise level sharing each batch read."""

from __future__ import annotations

from pathlib import Path

import click
from refseg.core.cli import Resumable, current_runtime, say, user_errors
from refseg.core.options import dataclass_options
from refseg.heads.distributed import Ranks
from refseg.heads.settings import SweepSettings
from refseg.heads.sweep import SUMMARY_MD, run_sweep_settings
from refseg.heads.sweep_grid import RUNS

ON_INTERRUPT = Resumable("the heads' completed epochs are kept under {out}")  # what Ctrl-C keeps


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@dataclass_options(SweepSettings)
@user_errors
def main(**options):
    """Train every combination of GRID in passes that fit in memory (one read of each batch feeds every
    head of a pass); each head gets a run directory refseg-eval reads, and the sweep a summary of mean and
    std over seeds per cell."""
    settings = SweepSettings(**options)
    rows = run_sweep_settings(settings, progress=current_runtime().progress)
    summary = Path(settings.out) / SUMMARY_MD
    if rows and summary.is_file():
        click.echo(summary.read_text(), nl=False)
    if not settings.dry_run and Ranks.from_env().main:  # (under torchrun, rank 0 writes the summary)
        say(f"wrote {summary}, {summary.with_suffix('.csv')} and a run directory per head under "
            f"{Path(settings.out) / RUNS} (refseg-eval --run reads each)")


if __name__ == "__main__":
    main()
