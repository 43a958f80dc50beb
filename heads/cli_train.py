"""`refseg-train-head`: train a head on one noise level of a feature cache."""

from __future__ import annotations

import json

import click

from refseg.cache.store import Coverage
from refseg.core.cli import Resumable, current_runtime, user_errors
from refseg.core.metrics import format_table
from refseg.core.options import dataclass_options
from refseg.heads.distributed import Ranks
from refseg.heads.settings import TrainSettings
from refseg.heads.train import run_training

ON_INTERRUPT = Resumable("the epochs completed so far are kept in {out}", "--resume")  # what Ctrl-C keeps


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@dataclass_options(TrainSettings)
@user_errors
def main(**options):
    """Train a head on cached features of one noise level; writes RUN/{head,best,state}.safetensors,
    config.json and metrics.jsonl."""
    settings = TrainSettings(**options)
    summary = run_training(settings, progress=current_runtime().progress)
    if not Ranks.from_env().main:  # under torchrun, rank 0 reports
        return
    if summary.get("val"):
        names = {"cache": "training cache", "val_cache": "val cache"}
        incomplete = [f"incomplete {names[key]}: {Coverage.from_dict(c).describe()}"
                      for key, c in (summary.get("coverage") or {}).items() if c and not c["complete"]]
        if incomplete:  # the table's header says what the numbers are not (--allow-incomplete)
            click.echo("Caveats: " + "; ".join(incomplete))
        click.echo(format_table([(f"T={settings.noise_t} (val, last epoch)", summary["val"])]))
    if summary.get("best_epoch") is not None:
        click.echo(f"kept epoch {summary['best_epoch']} (val oIoU {summary['best_val_oIoU']:.2f}) as "
                   f"{summary['run']}/best.safetensors; the last epoch's weights are head.safetensors")
    else:
        click.echo(f"wrote {summary['run']} (weights of the last epoch: head.safetensors)")
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "val"}))  # last: a script reads this line


if __name__ == "__main__":
    main()
