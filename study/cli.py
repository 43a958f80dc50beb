"""`refseg-report`: the whole noise-ablation study, with its table and figures, in one command (`demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from refseg.core.cli import Resumable, say, user_errors
from refseg.core.options import dataclass_options
from refseg.study.demo_config import NOT_OPTIONS, DemoConfig

ON_INTERRUPT = Resumable("the caches and runs finished so far are kept under {out}")  # what Ctrl-C keeps


@click.group(help="Studies over the whole pipeline (the demo: the report's Table 4 noise ablation, with seeds).")
def main():
    pass


@main.command(help="Synthetic data -> caches at each T -> attention probe -> a sweep of heads × T × seeds with a "
                   "text-blind baseline -> table (mean ± std), computed conclusions and figures, under --out.")
@dataclass_options(DemoConfig, skip=NOT_OPTIONS)
@user_errors  # adds --quiet (and --threads, which DemoConfig's own field replaces: its default is 2)
def demo(quiet, **settings):
    from refseg.study.demo import run_demo  # deferred: the study imports torch, and --help must be fast

    cfg = DemoConfig(**settings, progress=not quiet)
    result = run_demo(cfg)
    click.echo(f"\nmodel: {result['model']}; timings (s): {json.dumps(cfg.timings)}")
    say(f"wrote {', '.join(sorted(p.name for p in result['files'].values()))} under {Path(cfg.out)}", enabled=not quiet)
