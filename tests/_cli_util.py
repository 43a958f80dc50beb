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
