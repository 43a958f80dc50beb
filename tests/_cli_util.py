"""The one-line error contract, as the tests check it: exit 2, one `error: ...` line on stderr, no traceback."""

from __future__ import annotations


def one_line(stderr: str) -> str:
    """The single `error: ...` line of `stderr` (fails when there are more lines, or another start)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def one_line_error(result, *fragments: str) -> str:
    """A click `CliRunner` result that is a user error: exit 2, one line holding every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    line = one_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.output
    return line


def refused_model_copy(folder, tmp_path, case: str, edit, words: str) -> str:
    """Copy model `folder` to tmp_path/case, `edit` the copy, and load it: the ModelError's one line, which
    names the folder and holds `words`, is returned."""
    import shutil

    import pytest

    from refseg.backbones.loading import load_backbone
    from refseg.core.errors import ModelError

    broken = tmp_path / case
    shutil.copytree(folder, broken)
    edit(broken)
    with pytest.raises(ModelError) as err:
        load_backbone(str(broken))
    message = str(err.value)
    assert message.startswith(f"cannot load model {str(broken)!r}: ") and words in message, message
    assert "\n" not in message and not message.rstrip().endswith(":")
    return message
