"""A command's options generated from its settings dataclass: one source for each default.

A command's settings are a dataclass's fields, and its click options are generated from them
(`dataclass_options`), so a default or a help text is written once, at the field (`cli(...)`).
"""

from __future__ import annotations

import dataclasses

import click


def cli(help: str = "", *, flag: str | None = None, type=None, multiple: bool = False,
        show_default=True) -> dict:
    """Field metadata saying how the field appears on the command line.

        batch_size: int = field(default=4, metadata=cli("Samples per forward pass."))

    `flag` overrides the option's name (default `--field-name`); `type` is a click type (default
    from the annotation: int, float, str, bool; `X | None` allows None); `multiple` repeats it;
    `show_default` may be a string, shown instead of the value (for a default that is computed).
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
