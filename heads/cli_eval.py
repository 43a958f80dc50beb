"""`refseg-eval`: metrics of a trained head on a cache, as the report's table."""

from __future__ import annotations

import click

from refseg.core.cli import dataclass_options, user_errors
from refseg.heads.settings import EvalSettings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@dataclass_options(EvalSettings)
@user_errors
def main(**options):
    """Evaluate RUN on CACHE: P@0.5..P@0.9, oIoU, mIoU in percent."""
    from refseg.core.metrics import format_table
    from refseg.heads.evaluate import run_evaluation
    from refseg.heads.run_dir import read_config

    settings = EvalSettings(**options)
    summary = run_evaluation(settings, progress=True)
    t = settings.noise_t if settings.noise_t is not None else read_config(settings.run)["noise_t"]
    click.echo(format_table([(f"T={t}", summary)], first_col="Noise"))
    click.echo(f"{summary['n']} sentences, protocol {settings.protocol}")


if __name__ == "__main__":
    main()
