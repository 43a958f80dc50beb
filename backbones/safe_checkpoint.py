"""Read a training checkpoint (`torch.save`d `.pth`) without letting its pickle run code.

A `.pth` is a pickle: it can name any importable callable and have the unpickler call it. torch's
`weights_only` unpickler allows only tensors, storages and plain containers (dict, list, tuple,
`collections.OrderedDict`, scalars) and refuses every other global before calling anything. The one
addition here is `argparse.Namespace`, which VPD's `refer/train.py` saves as `args`: its name is
mapped to `SavedArgs`, a plain holder of the namespace's fields, so no argparse code and no other
class runs. Anything else the file names (a `__reduce__` payload, a custom class) is refused with
one line, before any of it runs.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from refseg.core.errors import ModelError


class SavedArgs:
    """An `argparse.Namespace` as read from a checkpoint: its fields as plain data in `values`.

    Built by the unpickler with `__new__` (no arguments) and filled by `__setstate__` with the
    namespace's `__dict__`; only plain values are kept.
    """

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.values = {}
        return obj

    def __init__(self, *args, **kwargs):  # a REDUCE naming argparse.Namespace(**kw) lands here: keep kw
        self.values = {k: v for k, v in kwargs.items() if _plain(v)}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = state[0]
        self.values = {str(k): v for k, v in (state or {}).items() if _plain(v)} if isinstance(state, dict) else {}


def _plain(value) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def read_checkpoint(path) -> dict:
    """The checkpoint's top-level dict, tensors on the CPU, `args` (if a Namespace) as `SavedArgs`.

    Raises `ModelError` (one line) for a missing file, a file that is not a torch checkpoint, or one
    that names anything besides tensors, plain containers and `argparse.Namespace`. Zip-format files
    are memory-mapped, so parts that are never used (optimizer state) are never read from disk.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} does not exist")
    if _torch_version() < (2, 6):  # safe_globals takes (class, "module.name") pairs from torch 2.6 on
        raise ModelError(f"reading training checkpoints safely needs torch >= 2.6 (this is {torch.__version__}); "
                         "upgrade torch to import it")
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([(SavedArgs, "argparse.Namespace")]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split("Check the documentation")[0].split())
        raise ModelError(f"refusing to load checkpoint {path}: it holds more than tensors and plain data "
                         f"({reason[:300]})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"checkpoint {path} holds a {type(data).__name__}, not a dict of parts")
    return data


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def saved_args(checkpoint: dict) -> dict:
    """The checkpoint's `args` as a plain dict ({} when absent or not a namespace/dict)."""
    args = checkpoint.get("args")
    if isinstance(args, SavedArgs):
        return dict(args.values)
    if isinstance(args, dict):
        return {k: v for k, v in args.items() if isinstance(k, str) and _plain(v)}
    return {}
