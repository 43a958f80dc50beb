"""Backbone families, by name: one module each (docs/DESIGN.md §4). `family_for_index` finds a folder's."""

from __future__ import annotations

from refseg.backbones.families import flux, sd, sd2, sd3, sdxl
from refseg.backbones.families.base import Family, NoiseInput, TextConditioning, read_model_index

# by name, in detection order (`family_for_index` asks each in turn): SD1.x's pipeline class first
FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in (sd, sd2, sdxl, sd3, flux)}


def tiny_names() -> dict[str, Family]:
    """--model value -> family, for the tiny random models ("tiny", "tiny-sd2", ...)."""
    return {f.tiny_name: f for f in FAMILIES.values()}


def family_for_index(model_index: dict) -> Family | None:
    """The family a model_index.json names (its `_class_name`), or None."""
    for family in FAMILIES.values():
        if family.detect(model_index):
            return family
    return None


__all__ = ["FAMILIES", "Family", "NoiseInput", "TextConditioning", "family_for_index", "read_model_index",
           "tiny_names"]
