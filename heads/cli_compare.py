"""`refseg-compare`: one table across runs and sweeps, grouped by the settings that differ."""

from __future__ import annotations

from pathlib import Path

import click

from refseg.core.cli import current_runtime, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--cache", "caches", multiple=True, type=click.Path(),
              help="Evaluate every run on this cache (repeat: val, testA, testB); columns per cache. Without it: "
                   "each run's recorded best val metrics.")
@click.option("--out", type=click.Path(), default=None, help="Also write the table to FILE.md or FILE.csv.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ... (with --cache).")
@user_errors
def main(runs, caches, out, device):
    """Compare head runs (RUN directories, or sweep directories standing for their runs): the settings
    that differ, then the metrics; runs that differ only by seed are one row, mean ± std."""
    from refseg.core.errors import RefsegError
    from refseg.core.paths import check_writable
    from refseg.heads.compare import compare, format_markdown, write_table

    if out is not None:
        if Path(out).suffix.lower() not in (".md", ".csv"):
            raise RefsegError(f"--out {out} must end in .md or .csv")
        check_writable(out, "--out")
    rows = compare(runs, caches, device=device, progress=current_runtime().progress)
    click.echo(format_markdown(rows), nl=False)
    if out is not None:
        write_table(rows, out)


if __name__ == "__main__":
    main()
