"""The documented command reference is the commands' real --help (regenerate with `make docs`)."""

from pathlib import Path

from refseg.study.cli_reference import reference

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    documented = (ROOT / "docs" / "CLI.md").read_text()
    assert documented == reference(), "docs/CLI.md is stale: run `make docs`"


def test_readme_names_every_command_and_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("refseg-data", "refseg-extract", "refseg-cache", "refseg-train-head", "refseg-eval",
                    "refseg-report", "make demo", "make test"):
        assert command in readme, command
