"""`refseg-probe`: zero-shot probes of a cache, with no head trained (`refseg-probe attention`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from refseg.core.cli import say, user_errors
from refseg.core.options import cli, dataclass_options


@dataclass(kw_only=True)
class AttentionProbeSettings:
    cache: str = field(metadata=cli("The cache store (CACHE.zarr) with attention tensors (attn_s16, ...).",
                                    type=click.Path()))
    noise_ts: tuple[int, ...] = field(default=(), metadata=cli(
        "Noise level (repeatable; default: every level of the cache).", flag="--noise-t", type=int, multiple=True,
        show_default="all"))
    threshold: float | None = field(default=None, metadata=cli(
        "Fix the mIoU threshold (0-1) instead of choosing the best of 0.05..0.95 on the same samples.",
        show_default="best"))
    out: str | None = field(default=None, metadata=cli("Also write the Markdown table here.", type=click.Path()))
    csv: str | None = field(default=None, metadata=cli("Also write the rows as CSV here.", type=click.Path()))


@click.group()
def main():
    """Zero-shot probes of a feature cache: no training."""


@main.command(help="How well the cache's cross-attention maps point at the referred object, per noise level and "
                   "stride: pointing accuracy and best-threshold mIoU of the map averaged over the sentence's "
                   "content tokens, each next to its chance level (the mean mask share).")
@dataclass_options(AttentionProbeSettings)
@user_errors
def attention(**options):
    from refseg.study.probe import probe_attention, probe_table_csv, probe_table_md  # deferred: torch; fast --help

    s = AttentionProbeSettings(**options)
    rows = probe_attention(s.cache, noise_ts=s.noise_ts or None, threshold=s.threshold)
    table = probe_table_md(rows)
    click.echo(table, nl=False)
    for path, text in ((s.out, table), (s.csv, probe_table_csv(rows) if s.csv else None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            say(f"wrote {path}")
