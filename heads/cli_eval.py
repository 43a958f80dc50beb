"""`refseg-eval`: metrics of a trained head on a cache, as the report's table."""

from __future__ import annotations

import click
from refseg.core.cli import current_runtime, say, user_errors
from refseg.core.options import dataclass_options
from refseg.core.metrics import format_table
from refseg.heads.evaluate import evaluate_run
from refseg.heads.settings import EvalSettings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@dataclass_options(EvalSettings)
@user_errors
def main(**options):
    """Evaluate RUN on CACHE: P@0.5..P@0.9, oIoU, mIoU in percent."""
    settings = EvalSettings(**options)
    result = evaluate_run(settings, progress=current_runtime().progress)
    summary, loaded = result.summary, result.loaded
    if loaded.caveats:  # the table's header says what the numbers are not (stderr said it already)
        click.echo("Caveats: " + "; ".join(c.short for c in loaded.caveats))
    click.echo(format_table([(f"T={loaded.noise_t}", summary)], first_col="Noise"))
    click.echo(f"{scored_line(summary['n'], loaded)}, protocol {settings.protocol}, checkpoint {loaded.checkpoint}")
    written = [str(path) for path in (settings.json_out, settings.per_sample, settings.overlays) if path]
    if written:
        say(f"wrote {', '.join(written)}")


def scored_line(n: int, loaded) -> str:
    """"335 sentences", or with samples skipped as bad at extraction (--skip-bad) how many of how many."""
    skipped = loaded.coverage.skipped
    if not skipped:
        return f"{n} sentences"
    ids = skipped_sent_ids(loaded)
    shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
    return (f"scored {n} of {loaded.coverage.samples} sentences; {skipped} skipped as bad at extraction "
            f"(sent_ids {shown}) count in no metric")


def skipped_sent_ids(loaded) -> list[int]:
    cache = loaded.cache
    return [int(s) for s in cache.index["sent_id"][cache.skipped(loaded.noise_t)]]


if __name__ == "__main__":
    main()
