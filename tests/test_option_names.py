"""Every `--option` that a message of refseg's library code tells the user to pass exists on some
refseg command (issue 23: the probe suggested `--attn-stride`, the option is `--attn-strides`)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("refseg_core", "backbones", "cache", "extract", "heads", "study")
# options of tools that are not refseg's, named in messages on purpose
FOREIGN = {"--help", "--index-url", "--extra-index-url", "--nproc-per-node", "--nproc_per_node", "--standalone"}


def all_options() -> set[str]:
    from refseg.study.cli_reference import COMMANDS

    names = set()

    def walk(command):
        for param in command.params:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    from refseg.backbones.tiny_synth.cli import main as tiny_synth_main

    for command in (*COMMANDS.values(), tiny_synth_main):
        walk(command)
    return names


def test_every_option_a_message_names_exists():
    known = all_options() | FOREIGN
    named = {}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "f\"" not in line and "\"" not in line:
                    continue
                # (an option built from parts, f"--no-{flag[2:]}", ends at the brace: not a name)
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])(?![-{])", line):
                    named.setdefault(option, f"{path.relative_to(REPO)}:{line_no}")
    unknown = {o: where for o, where in named.items() if o not in known}
    assert "--attn-strides" in named and "--attn-strides" in known
    assert not unknown, sorted(unknown.items())
