"""docs/CLI.md, generated from the commands' own `--help`, so the documented options cannot drift.

    python -m refseg.study.cli_reference > docs/CLI.md     (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import click
from click.testing import CliRunner

from refseg.cache.cli import main as cache_main
from refseg.extract.cli import main as extract_main
from refseg.heads.cli_eval import main as eval_main
from refseg.heads.cli_train import main as train_main
from refseg.core.data_cli import main as data_main
from refseg.study.cli import main as report_main
from refseg.study.cli_import import main as import_main
from refseg.study.cli_predict import main as predict_main
from refseg.study.cli_probe import main as probe_main
from refseg.heads.cli_compare import main as compare_main
from refseg.heads.cli_sweep import main as sweep_main

COMMANDS = {
    "refseg-data": data_main,
    "refseg-extract": extract_main,
    "refseg-cache": cache_main,
    "refseg-train-head": train_main,
    "refseg-eval": eval_main,
    "refseg-sweep": sweep_main,
    "refseg-compare": compare_main,
    "refseg-probe": probe_main,
    "refseg-report": report_main,
    "refseg-import": import_main,
    "refseg-predict": predict_main,
}


def _help(command, name: str, args: list[str]) -> str:
    result = CliRunner().invoke(command, [*args, "--help"], prog_name=name, terminal_width=100)
    return result.output.rstrip()


def reference() -> str:
    parts = ["# Command reference\n", "Generated from each command's `--help` by `python -m refseg.study.cli_reference`.\n"]
    for name, command in COMMANDS.items():
        parts.append(f"## `{name}`\n\n```\n{_help(command, name, [])}\n```\n")
        if isinstance(command, click.Group):
            for sub in command.list_commands(click.Context(command)):
                parts.append(f"### `{name} {sub}`\n\n```\n{_help(command, name, [sub])}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
