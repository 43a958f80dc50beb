"""The head registry: `HEADS` maps a name to a head class, filled by the `@register_head` decorator.

Registration is that one decorator. The built-in heads (vpd, linear, film) register when
`refseg.heads` is imported (its `__init__` imports their modules, once); a head outside refseg
registers when the module defining it is imported, before `build_head` or the command lines look.
"""

from __future__ import annotations

from torch import nn

from refseg.core.feature_spec import FeatureSpec

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    """Class decorator: `@register_head("vpd")` makes the head buildable by name (see heads/base.py)."""

    def decorate(cls):
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"a head named {name!r} is already registered ({HEADS[name].__name__})")
        cls.head_name = name
        HEADS[name] = cls
        return cls

    return decorate


def build_head(name: str, spec: FeatureSpec, **head_args) -> nn.Module:
    """Build head `name` for the tensors in `spec`; `head_args` are the head's own options (hidden=...)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r} (available: {', '.join(head_names())})")
    return HEADS[name](spec, **head_args)


def head_names() -> list[str]:
    return sorted(HEADS)
