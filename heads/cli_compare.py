"""`refseg-compare`: one table across runs and sweeps, grouped by the settings that differ."""

from __future__ import annotations

import click
from refseg.core.cli import current_runtime, user_errors
from refseg.core.options import dataclass_options
from refseg.heads.compare import format_markdown, run_comparison, write_table
from refseg.heads.settings import CompareSettings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@dataclass_options(CompareSettings, skip=("runs",))
@user_errors
def main(**options):
    """Compare head runs (RUN directories, or sweep directories standing for their runs): the settings
    that differ, then the metrics; runs that differ only by seed are one row, mean ± std."""
    settings = CompareSettings(**options)
    settings.check()
    rows = run_comparison(settings, progress=current_runtime().progress)
    click.echo(format_markdown(rows), nl=False)
    if settings.out is not None:
        write_table(rows, settings.out)


if __name__ == "__main__":
    main()
