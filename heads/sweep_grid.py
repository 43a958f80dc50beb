"""A sweep's grid (`refseg-sweep --grid GRID.yaml`, heads/sweep.py): read, checked and expanded into
one `Job` per head before anything is written.

Each key is a `refseg-train-head` option in snake case (a TrainSettings field, or an argument of the
head such as `tensors` or `text_hidden`); a list is a swept axis, a scalar is fixed. `tensors` takes
a list of names as one value: a list of lists sweeps it. Every head named in the grid must take each
head argument given. Bad keys and values are refused in one line. A job's run directory is
`DIR/runs/<name>`, `<name>` spelling its swept values (`head=film,lr=0.001,noise_t=5,seed=1`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from refseg.core.errors import RefsegError
from refseg.heads.registry import HEADS, head_names
from refseg.heads.settings import TrainSettings
from refseg.heads.train_setup import STREAM_KEYS

RUNS = "runs"  # DIR/runs/<name>: each job's run directory
OWN_KEYS = ("cache", "val_cache", "out", "resume")  # set by the sweep itself, not by the grid
REQUIRED = ("head", "noise_t")


@dataclass
class Job:
    """One head of the sweep: its run's name, its settings and head arguments, and its swept values."""

    name: str
    settings: TrainSettings
    head_args: dict
    swept: dict  # {key: value} of the grid's axes

    def stream(self) -> tuple:
        """The settings of its batch stream: the jobs that share one can train on the same batches."""
        return tuple(_hashable(getattr(self.settings, key)) for key in STREAM_KEYS)


def load_grid(path) -> dict:
    """A GRID.yaml file -> the grid (a mapping), read with yaml.safe_load; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise RefsegError(f"grid {path} does not exist" if not path.exists() else f"grid {path} is not a file")
    try:
        grid = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RefsegError(f"grid {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(grid, dict) or not grid:
        raise RefsegError(f"grid {path} must be a mapping of option: value or [values], e.g. 'head: [vpd, film]'")
    return grid


def expand(grid: dict, cache, val_cache, out, *, data_seed: int = 0) -> list[Job]:
    """Every combination of the grid's axes as a Job, checked (keys, types, ranges); nothing is written."""
    if not isinstance(grid, dict) or not grid:
        raise RefsegError("the grid must be a non-empty mapping of option: value or [values]")
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    missing = [key for key in REQUIRED if key not in grid]
    if missing:
        raise RefsegError(f"the grid must give {' and '.join(missing)} (e.g. 'head: [vpd, film]', 'noise_t: 5')")
    if "data_seed" in grid and data_seed != 0:
        raise RefsegError("give the data seed once: in the grid (data_seed) or as --data-seed, not both")
    axes = {key: _axis(key, value) for key, value in grid.items()}
    heads = sorted({str(h) for h in axes["head"]})
    unknown_heads = [h for h in heads if h not in HEADS]
    if unknown_heads:
        raise RefsegError(f"unknown head {unknown_heads[0]!r} in the grid (available: {', '.join(head_names())})")
    head_keys = [key for key in axes if key not in fields]
    for key in axes:
        if key in OWN_KEYS:
            raise RefsegError(f"{key} is not a grid key: the sweep sets it (--cache, --val-cache, --out)")
    for key in head_keys:
        for head in heads:
            if key not in _head_parameters(head):
                options = sorted(set(fields) - set(OWN_KEYS)) + sorted(_head_parameters(head))
                raise RefsegError(f"unknown grid key {key!r} for head {head!r}: a grid key is a refseg-train-head "
                                  f"option in snake case ({', '.join(options)})")
    swept = [key for key, value in grid.items() if isinstance(value, list) and not _fixed_list(key, value)]
    jobs, names = [], set()
    for combination in itertools.product(*axes.values()):
        values = {k: _coerce(k, v, fields[k]) if k in fields else v for k, v in zip(axes, combination)}
        options = {k: v for k, v in values.items() if k in fields}
        options.setdefault("data_seed", data_seed)
        head_args = {k: v for k, v in values.items() if k not in fields}
        name = run_name({k: values[k] for k in swept})
        settings = TrainSettings(cache=cache, val_cache=val_cache, out=Path(out) / RUNS / name, **options)
        settings.check()
        if name in names:
            raise RefsegError(f"the grid gives run {name!r} twice: a list holds a value twice")
        names.add(name)
        jobs.append(Job(name, settings, head_args, {k: values[k] for k in swept}))
    return jobs


def _axis(key: str, value) -> list:
    """A grid value -> the list of its values (a scalar: one)."""
    if isinstance(value, dict):
        raise RefsegError(f"grid key {key!r} has a mapping as value: give a value or a list of values")
    if not isinstance(value, list) or _fixed_list(key, value):
        return [value]
    if not value:
        raise RefsegError(f"grid key {key!r} has an empty list: give at least one value")
    for v in value:
        if isinstance(v, dict) or (isinstance(v, list) and key != "tensors"):
            raise RefsegError(f"grid key {key!r} holds {v!r}: a list's values must be plain values")
    return value


def _fixed_list(key: str, value) -> bool:
    """`tensors: [s8, s16]` is one value (the names a head reads); `tensors: [[s8], [s8, s16]]` an axis."""
    return key == "tensors" and isinstance(value, list) and all(isinstance(v, str) for v in value)


def _coerce(key: str, value, f: dataclasses.Field):
    """A YAML value for TrainSettings field `f`, of the field's type (PyYAML reads 1e-3 as a string)."""
    kind = str(f.type).replace(" ", "")
    optional = "|None" in kind or "None|" in kind
    base = kind.replace("|None", "").replace("None|", "")
    if value is None and optional:
        return None
    if base == "float" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif base == "bool" and (isinstance(value, bool) or (key == "preload" and value == "auto")):
        return value
    elif base == "str" and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise RefsegError(f"grid key {key!r} must be {'a number' if base in ('int', 'float') else base}"
                      f"{' (a whole number)' if base == 'int' else ''}, got {value!r}")


def _head_parameters(head: str) -> set[str]:
    """The keyword arguments a head's constructor takes, but `hidden` (a TrainSettings field)."""
    parameters = inspect.signature(HEADS[head]).parameters
    return {name for name, p in parameters.items() if name not in ("self", "spec", "hidden")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def run_name(swept: dict) -> str:
    """The run directory's name: the swept values, sorted by key (`head=film,lr=0.001,seed=1`)."""
    if not swept:
        return "run"
    return ",".join(f"{key}={_spell(swept[key])}" for key in sorted(swept))


def _spell(value) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "none"
    elif isinstance(value, list):
        text = "+".join(_spell(v) for v in value)
    else:
        text = str(value)
    return text.replace(os.sep, "_").replace(",", "_")


def _hashable(value):
    return tuple(value) if isinstance(value, list) else (str(value) if isinstance(value, Path) else value)
