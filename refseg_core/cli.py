"""Shared command-line plumbing: user errors become one line on stderr and exit 2."""

import functools
import sys

import click

from refseg_core.errors import RefsegError

USER_ERROR_EXIT = 2


def fail(message: str) -> None:
    """Print `error: message` on one line to stderr and exit 2."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {line}", err=True)
    sys.exit(USER_ERROR_EXIT)


def user_errors(fn):
    """Decorate a click command body so that refseg's user errors (and bad files) exit 2 with one line.

    Programming errors still raise with a traceback: those are bugs to report, not user mistakes.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RefsegError as exc:
            fail(str(exc))
        except FileNotFoundError as exc:
            fail(f"file not found: {exc.filename or exc}")
        except PermissionError as exc:
            fail(f"permission denied: {exc.filename or exc}")
        except OSError as exc:
            # ENOSPC / EIO and friends: say what failed; what was already written stays valid.
            fail(f"I/O error: {exc.strerror or exc}{' (' + str(exc.filename) + ')' if exc.filename else ''}")

    return wrapper
