"""Shared command-line plumbing: user errors become one line on stderr and exit 2."""

import functools
import sys

import click

from refseg.core.errors import RefsegError

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


# ---- options generated from a dataclass ---------------------------------------------------------
# One source for each default: a command's settings are a dataclass's fields, and its click options
# are generated from them, so a default or a help text is written once (at the field).


def cli(help: str = "", *, flag: str | None = None, type=None, multiple: bool = False,  # noqa: A002
        show_default=True) -> dict:
    """Field metadata saying how the field appears on the command line.

        batch_size: int = field(default=4, metadata=cli("Samples per forward pass."))

    `flag` overrides the option's name (default `--field-name`); `type` is a click type (default
    from the annotation: int, float, str, bool; `X | None` allows None); `multiple` repeats it.
    """
    return {"cli": {"help": help, "flag": flag, "type": type, "multiple": multiple, "show_default": show_default}}


_SCALARS = {"int": int, "float": float, "str": str}


def _click_type(annotation) -> type | None:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    name = name.replace(" | None", "").replace("None | ", "").strip()
    return _SCALARS.get(name)


def dataclass_options(cls, *, skip=()):
    """Decorate a click command with one option per field of dataclass `cls` (except `skip`).

    A field without a default is a required option; a bool field is an `--x/--no-x` switch (an
    `is_flag` when its default is False and `flag` names one spelling). The command receives each
    value under the field's name, so `cls(**{f: opts[f] ...})` builds the settings.
    """
    import dataclasses

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            meta = f.metadata.get("cli", {})
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            kwargs = {"help": meta.get("help", ""), "show_default": meta.get("show_default", True)}
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs.update(required=True, show_default=False)
            else:
                kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            is_bool = _click_type(f.type) is None and str(f.type).startswith("bool")
            if is_bool and meta.get("flag"):
                fn = click.option(flag, f.name, is_flag=True, **kwargs)(fn)
            elif is_bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, **kwargs)(fn)
            else:
                kind = meta.get("type") or _click_type(f.type)
                fn = click.option(flag, f.name, type=kind, multiple=meta.get("multiple", False), **kwargs)(fn)
        return fn

    return decorate
