"""The store's fingerprint: what makes two extractions interchangeable, and how to say why they are not.

It covers the extraction record (backbone identity, extraction settings, dataset selection), the
FeatureSpec, and the exact samples (their sent_ids, in order). It does **not** cover the noise levels
(they are groups added to the same store), storage choices (shard size, codec), or the contents of the
dataset's files: those have their own digest (`dataset_sha256`, a root attribute beside the
fingerprint), so that a changed dataset is said as such without changing any store's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from refseg.cache.layout import DATASET_DIGEST_ATTR, SETTINGS_KEYS
from refseg.core.errors import CacheMismatchError
from refseg.core.feature_spec import FeatureSpec


def canonical(obj):
    """`obj` as it reads back from JSON (tuples become lists, keys sorted), so stored and new compare equal."""
    return json.loads(canonical_json(obj))


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_jsonable)


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")


def sample_selection(sent_ids) -> dict:
    """A short description of which samples a store holds (their count and a digest of the ids)."""
    ids = np.ascontiguousarray(np.asarray(sent_ids, dtype="<i8"))
    return {"n": int(len(ids)), "sent_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def fingerprint_payload(extraction_record: dict, spec: FeatureSpec, sent_ids) -> dict:
    """Everything the fingerprint covers, as plain JSON data (also what is stored in the root attrs)."""
    if not isinstance(extraction_record, dict) or set(extraction_record) != set(SETTINGS_KEYS):
        got = sorted(extraction_record) if isinstance(extraction_record, dict) else type(extraction_record).__name__
        raise ValueError(f"the extraction record must be a dict with exactly the keys {list(SETTINGS_KEYS)}, got {got}")
    payload = {key: extraction_record[key] for key in SETTINGS_KEYS}
    payload["spec"] = spec.to_dict()
    payload["samples"] = sample_selection(sent_ids)
    return canonical(payload)


# Where files live is not what they are: moving the dataset or a weights folder keeps a cache valid,
# because the weights hash (backbone) and the sent_ids digest (samples) say what was extracted.
LOCATION_KEYS = (("backbone", "model"), ("dataset", "data_root"), ("dataset", "image_root"))


# Backbone kinds that have a former name are hashed under it, so that stores fingerprinted with the
# former name keep their fingerprint: the shipped tiny-synth loads from a folder, is recorded as kind
# 'tiny-synth' and hashed as kind 'folder' (its weights hash says what it is either way).
FORMER_KIND = {"tiny-synth": "folder"}


def with_former_kind(backbone: dict) -> dict:
    """A backbone's settings with a renamed kind under its former name, as fingerprints hash it."""
    if backbone.get("kind") in FORMER_KIND:
        backbone = {**backbone, "kind": FORMER_KIND[backbone["kind"]]}
    return backbone


def with_current_kind(backbone: dict) -> dict:
    """A backbone's settings with a kind recorded under its former name shown as named today (a store of
    the shipped tiny-synth that records kind 'folder'), for messages."""
    for now, former in FORMER_KIND.items():
        if backbone.get("kind") == former and backbone.get("model") == now:
            return {**backbone, "kind": now}
    return backbone


def without_locations(payload: dict, former_kinds: bool = True) -> dict:
    """`payload` as the fingerprint sees it: without where files live, kinds under their former names
    (`former_kinds=False`: under their names today, as a message shows them)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in payload.items()}
    if not former_kinds and isinstance(out.get("backbone"), dict):
        out["backbone"] = with_current_kind(out["backbone"])  # before the model's name is dropped
    for group, key in LOCATION_KEYS:
        if isinstance(out.get(group), dict):
            out[group].pop(key, None)
    if former_kinds and isinstance(out.get("backbone"), dict):
        out["backbone"] = with_former_kind(out["backbone"])
    return out


def compute_fingerprint(payload: dict) -> str:
    return hashlib.sha256(canonical_json(without_locations(payload)).encode()).hexdigest()[:16]


# ---- the dataset's files --------------------------------------------------------------------------


def dataset_sha256(*paths) -> str:
    """sha256 over the named files (their base names and bytes): the refs pickle and instances.json.

    Cheap (the images are not read: a replaced image is not seen) and independent of where the dataset
    lives, like the fingerprint. Recorded in the store (`DATASET_DIGEST_ATTR`) when it is created.
    """
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(os.fspath(path)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def dataset_changed(stored_attrs: dict, digest: str | None) -> bool:
    """Whether the dataset files now differ from those the store was extracted from (False when either
    digest is unknown: a store that records none is not checked)."""
    stored = stored_attrs.get(DATASET_DIGEST_ATTR)
    return bool(stored and digest and stored != digest)


DATASET_CHANGED = "the dataset changed since this cache was made"


def dataset_changed_message(path: str, stored_attrs: dict, digest: str) -> str:
    """The clause that names a changed dataset, with both digests' beginnings."""
    return (f"{DATASET_CHANGED} ({path}: its refs/instances files had sha256 {stored_attrs[DATASET_DIGEST_ATTR][:12]}, "
            f"they have {digest[:12]} now)")


def check_dataset_unchanged(path: str, stored_attrs: dict, refs_path, instances_path) -> None:
    """Refuse to read the dataset for a store extracted from other versions of its files (one line).

    For readers that look samples of the store up in the dataset (GT at the original size, overlays):
    a sample of the store may be missing from the new files, or be another object there.
    """
    digest = dataset_sha256(refs_path, instances_path)
    if dataset_changed(stored_attrs, digest):
        raise CacheMismatchError(f"{dataset_changed_message(path, stored_attrs, digest)}: its samples may not be "
                                 "in the dataset any more, or name other objects; restore the dataset the cache was "
                                 "made from, or extract the cache again")


_ABSENT = object()


def diff(stored, requested, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, stored value, requested value) for every leaf that differs, in key order."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += diff(stored.get(key, _ABSENT), requested.get(key, _ABSENT), path)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        out = []
        for i, (a, b) in enumerate(zip(stored, requested)):
            out += diff(a, b, f"{prefix}[{i}]")
        return out
    if stored == requested and type(stored) is type(requested):
        return []
    return [(prefix or "(root)", stored, requested)]


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _show_value(key: str, value) -> str:
    """A setting's value as a message shows it: SD1.x records no family (its identity predates them)."""
    if key == "backbone.family" and (value is None or value is _ABSENT):
        return "'sd' (SD1.x, recorded without a family)"
    return _show(value)


# what `mismatch_message` ends with; a command without --overwrite (refseg-report demo) replaces it
OVERWRITE_ADVICE = " (use --overwrite to replace it)"


def mismatch_message(path: str, stored: dict, requested: dict, first: str | None = None) -> str:
    """One line naming each differing key path with both values (after `first`, the cause when known:
    a changed dataset).

    The spec follows from the backbone and extraction settings, so when those differ the spec's own
    differences are summarised instead of listed.
    """
    differing = {key for key, _, _ in diff(without_locations(stored), without_locations(requested))}
    # what differs is what the fingerprint sees; the values are shown as named today (kind tiny-synth, not folder)
    found = [(key, a, b) for key, a, b in diff(without_locations(stored, False), without_locations(requested, False))
             if key in differing]
    settings_differ = any(key.split(".")[0].split("[")[0] in SETTINGS_KEYS for key, _, _ in found)
    parts = [f"{key} is {_show_value(key, a)} in the store but {_show_value(key, b)} now" for key, a, b in found
             if not (settings_differ and key.startswith("spec"))]
    if settings_differ and any(key.startswith("spec") for key, _, _ in found):
        parts.append("the feature spec differs accordingly")
    if not parts:  # same payload, different fingerprint: the stored fingerprint was edited by hand
        parts = ["its fingerprint attribute does not match its own settings"]
    if first:
        parts.insert(0, first)
    return f"cache {path} was made with different settings: {'; '.join(parts)}{OVERWRITE_ADVICE}"
