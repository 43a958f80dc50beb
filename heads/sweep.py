"""One pass, many heads: `refseg-sweep` trains every combination of a grid, and the heads that share
a batch stream share each batch (DINOv2's linear evaluation trains its many heads on one forward).

```python
from refseg.heads.sweep import run_sweep, summarize
rows = run_sweep({"head": ["vpd", "film"], "seed": [0, 1, 2], "noise_t": [0, 5], "hidden": 64, "epochs": 12},
                 "train.zarr", "val.zarr", "sweeps/s1")
```

The grid: each key is a `refseg-train-head` option in snake case (a TrainSettings field, or an
argument of the head such as `tensors` or `text_hidden`); a list is a swept axis, a scalar is fixed.
`tensors` takes a list of names as one value: a list of lists sweeps it. Every head named in the grid
must take each head argument given. Bad keys and values are refused, in one line, before anything is
written.

What is shared: the heads whose stream settings agree (`train_setup.STREAM_KEYS`: noise level, batch
size, data seed, max samples, ...) are set up together (`train_setup.set_up_heads`) and trained by
the loop of `refseg-train-head` (`train.run_epochs`): each batch is read, copied to the device and
fed to each of them, and each val batch is read once for all. The data order is seeded by the data
seed alone, so every head sees the batches its solo run would, and its weights are the bytes of a
solo `refseg-train-head` run with the same settings (tests/test_sweep.py). Each head keeps its own
optimizer, schedule, seed and run directory, `DIR/runs/<name>/`, where `<name>` spells the swept
values (`head=film,lr=0.001,noise_t=5,seed=1`): `refseg-eval --run DIR/runs/<name>` reads it.

Passes and memory: before anything is written, the sweep plans its heads (heads/sweep_plan.py): the
heads of one batch stream train together while they fit in half the available RAM, and in several
passes of that stream otherwise, run folders made pass by pass; `refseg-sweep --dry-run` prints the
plan and writes nothing. A head's bytes do not depend on the passes (tests/test_sweep_plan.py).

Resuming: run the same command again. A head whose run holds all its epochs is skipped; a head
stopped mid-way continues after its last completed epoch (the run directory's `--resume`), with
the weights an uninterrupted sweep gives. A head that diverges stops alone and is reported.

Under torchrun, the heads are split across the ranks, not the batch: rank r trains heads r::world
(of the grid's order) in its own passes, without DDP, on its own device (cuda:LOCAL_RANK on GPUs).
A head then needs no communication at all, each stays byte-equal to its solo run, and K heads on W
GPUs take about K/W of the time; each rank reads the batches of its own streams. Rank 0 writes the
summary once every rank is done.

On one machine's CPU, `processes=P` (`refseg-sweep --processes P`) splits the heads the same way
across P local processes of threads/P torch threads each: a small decoder keeps two threads busy
only part of the time, so on 2 cores two one-thread processes can train more heads per second than
one process on two threads, once the sweep is long enough to repay the processes' start-up of a few
seconds (BENCHMARKS.md, "Sweep"). Each head is then the bytes of its solo run with --threads
threads/P (tests/test_sweep.py): the thread count, not the split, is what changes bytes. The
processes are spawned, so a head registered outside refseg must be importable by its module there.

`DIR/summary.csv` and `DIR/summary.md` (`summarize`): one row per cell (the swept values but the
seed), with `n_seeds` and `<metric>_mean`, `<metric>_std` (sample std, ddof=1; '' for one seed) of
P@0.5..P@0.9, oIoU and mIoU at each run's selected epoch (its best val oIoU: best.safetensors).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refseg.core.errors import RefsegError, RunWriteError
from refseg.core.metrics import TABLE_COLUMNS
from refseg.heads import run_dir
from refseg.heads.registry import HEADS, head_names
from refseg.heads.settings import TrainSettings
from refseg.heads.sweep_plan import plan

SWEEP_FILE = "sweep.json"  # the grid and data seed of the sweep in DIR (what `summarize` reads)
RUNS = "runs"
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
OWN_KEYS = ("cache", "val_cache", "out", "resume")  # set by the sweep itself, not by the grid
REQUIRED = ("head", "noise_t")
RESUME_ADVICE = ("the heads' completed epochs are kept: {remedy}, then rerun the same refseg-sweep command (it "
                 "resumes each head after its last completed epoch)")


@dataclass
class Job:
    """One head of the sweep: its run's name, its settings and head arguments, and its swept values."""

    name: str
    settings: TrainSettings
    head_args: dict
    swept: dict  # {key: value} of the grid's axes

    def stream(self) -> tuple:
        from refseg.heads.train_setup import STREAM_KEYS

        return tuple(_hashable(getattr(self.settings, key)) for key in STREAM_KEYS)


# ---- the grid -----------------------------------------------------------------------------------
def load_grid(path) -> dict:
    """A GRID.yaml file -> the grid (a mapping), read with yaml.safe_load; one-line errors."""
    import yaml

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


# ---- running it ---------------------------------------------------------------------------------
def run_sweep(grid: dict, cache, val_cache, out, *, data_seed: int = 0, progress: bool = True,
              threads: int | None = None, processes: int = 1, dry_run: bool = False,
              memory_budget: int | None = None) -> list[dict]:
    """Train every head of `grid` on `cache` (validating on `val_cache`) into `out`; -> the summary rows.

    Rerun it to resume. `threads`: torch CPU threads while it runs (default: as they are), shared out
    among `processes` local CPU processes that split the heads (module docstring). The heads train in
    passes that fit `memory_budget` bytes (default: half the available RAM; heads/sweep_plan.py);
    `dry_run` prints that plan and writes nothing.
    """
    from refseg.heads.distributed import Ranks

    from refseg.core.paths import check_writable

    jobs = expand(grid, cache, val_cache, out, data_seed=data_seed)
    check_writable(out, "--out", directory=True)
    specs = _check_data(jobs)
    out = Path(out)
    ranks = Ranks.from_env()
    _check_processes(processes, ranks, jobs)
    if dry_run:
        done = {job.name for job in jobs if _finished(job)}
        print("\n".join(plan(jobs, specs, done, memory_budget).lines()), flush=True)
        return []
    budget = memory_budget if memory_budget is not None else _budget(processes)
    restore = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        _start_ranks(ranks)
        if ranks.main:
            (out / RUNS).mkdir(parents=True, exist_ok=True)
            run_dir.write_json(out / SWEEP_FILE, _record(grid, jobs, cache, val_cache, data_seed))
        ranks.barrier()
        try:
            if processes > 1:
                failed = _train_in_processes(jobs, processes, max(1, torch.get_num_threads() // processes), progress,
                                             specs, budget)
            else:
                failed = _train(jobs[ranks.rank::ranks.world], ranks, progress, specs, budget)
        except RunWriteError as exc:  # a run's file on a full disk: the sweep resumes by its own command
            written = getattr(exc, "written", None)
            if written is None or written.name not in run_dir.RUN_FILES:
                raise
            raise run_dir.write_failed(written, exc.code, RESUME_ADVICE) from None
        ranks.barrier()
        rows = summarize(out) if ranks.main else []
        if ranks.main:
            write_summary(out, rows)
    finally:
        ranks.stop()
        torch.set_num_threads(restore)
    if failed:  # said, not raised: the other heads' results stand
        print(f"warning: {len(failed)} of {len(jobs)} heads diverged and stopped early ({', '.join(failed)}); the "
              "summary leaves them out", file=sys.stderr, flush=True)
    return rows


def _check_data(jobs: list[Job]) -> dict:
    """The caches open, hold the noise levels, and every kind of head can be built on them: before anything
    is written (each distinct head once: a grid of thousands of seeds builds a few). -> cache path -> spec."""
    from refseg.heads.caches import as_cache
    from refseg.heads.train_setup import build_for_training

    opened, built = {}, set()
    for job in jobs:
        for path in (job.settings.cache, job.settings.val_cache):
            key = str(path)
            if key not in opened:
                opened[key] = as_cache(path)[0]
            opened[key].done(job.settings.noise_t)  # a missing noise level: the cache's CacheError
        kind = json.dumps([job.settings.head, job.settings.text_blind, job.head_args, str(job.settings.cache)],
                          sort_keys=True, default=str)
        if kind in built:
            continue
        try:
            build_for_training(job.settings, job.head_args, opened[str(job.settings.cache)].spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise RefsegError(f"run {job.name}: cannot build head {job.settings.head!r}: {exc}") from None
        built.add(kind)
    return {key: cache.spec for key, cache in opened.items()}


def _finished(job: Job) -> bool:
    return run_dir.completed_epoch(job.settings.out) >= job.settings.epochs


def _budget(processes: int) -> int | None:
    """Bytes one process's passes may take: half the available RAM, shared among the local processes."""
    from refseg.core.memory import available_memory

    available = available_memory()
    return None if available is None else available // 2 // max(1, processes)


def _check_processes(processes: int, ranks, jobs: list[Job]) -> None:
    from refseg.core.device import resolve_device

    if processes < 1:
        raise RefsegError(f"--processes must be at least 1 (got {processes})")
    if processes == 1:
        return
    if ranks.active:
        raise RefsegError("--processes splits the heads on one machine's CPU; under torchrun the ranks split them "
                          "already: leave it out")
    devices = sorted({str(resolve_device(job.settings.device)) for job in jobs} - {"cpu"})
    if devices:
        raise RefsegError(f"--processes is for training on the CPU; these heads train on {', '.join(devices)} "
                          "(one process feeds a GPU)")


def _train_in_processes(jobs: list[Job], processes: int, threads: int, progress: bool, specs: dict,
                        budget: int | None) -> list[str]:
    """Train jobs[i::processes] in local process i, each with `threads` torch threads; -> diverged heads.
    Process 0 alone shows progress. An error in one is raised here once they have all stopped."""
    from refseg.core.processes import run_in_processes

    shares = [jobs[i::processes] for i in range(processes)]
    calls = [(share, threads, progress and i == 0, specs, budget) for i, share in enumerate(shares) if share]
    return [name for names in run_in_processes(_train_share, calls) for name in names]


def _train_share(jobs: list[Job], threads: int, progress: bool, specs: dict, budget: int | None) -> list[str]:
    """One local process's part of a sweep (runs in a spawned process)."""
    from refseg.heads.distributed import Ranks

    torch.set_num_threads(threads)
    return _train(jobs, Ranks(), progress, specs, budget)


def _start_ranks(ranks) -> None:
    """Under torchrun: the process group, for the barriers only (no tensor crosses ranks)."""
    if ranks.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
        ranks.owns_group = True


def _train(jobs: list[Job], ranks, progress: bool, specs: dict, budget: int | None) -> list[str]:
    """Train this rank's jobs in the passes of their plan (heads/sweep_plan.py); -> the heads that diverged."""
    from refseg.core.device import resolve_device
    from refseg.heads.distributed import Ranks
    from refseg.heads.train import run_epochs
    from refseg.heads.train_setup import abandon_untrained, set_up_heads

    the_plan = plan(jobs, specs, {job.name for job in jobs if _finished(job)}, budget)
    _progress(progress, the_plan.lines()[0])
    failed, trained, started = [], the_plan.done, time.monotonic()
    for k, todo in enumerate(the_plan.passes, 1):
        s = todo[0].settings
        _progress(progress, f"sweep pass {k}/{len(the_plan.passes)}: T={s.noise_t}, {len(todo)} heads "
            f"({trained} of {the_plan.jobs} heads done before it{_eta(started, trained - the_plan.done, the_plan)})")
        trained += len(todo)
        device = s.device
        if ranks.active and resolve_device(device).type == "cuda":
            device = f"cuda:{ranks.local_rank}"  # each rank its own GPU
        runs = [(dataclasses.replace(job.settings, device=device, resume=run_dir.has_entries(job.settings.out)),
                 job.head_args) for job in todo]
        state = set_up_heads(runs, progress, ranks=Ranks(), labelled=True)
        try:
            run_epochs(state, keep_going=True)
        except Exception:  # (not Ctrl-C: its line says the sweep resumes)
            abandon_untrained(state)  # the pass's new runs that completed no epoch leave no folder behind
            raise
        finally:
            state.release()
        failed += [job.name for job, head in zip(todo, state.heads) if head.failed]
    return failed


def _progress(progress: bool, line: str) -> None:
    """The sweep's own progress (its plan, each pass: heads done of all, the time left) on stderr, apart from
    the heads' epoch lines, each labelled with its run's name."""
    if progress:
        print(line, file=sys.stderr, flush=True)


def _eta(started: float, trained_here: int, the_plan) -> str:
    """", about 4 min left" from the heads trained so far in this process (nothing before the first pass)."""
    if trained_here == 0:
        return ""
    left = (time.monotonic() - started) / trained_here * (the_plan.jobs - the_plan.done - trained_here)
    return f", about {left / 60:.0f} min left" if left >= 60 else f", about {left:.0f} s left"


def _record(grid: dict, jobs: list[Job], cache, val_cache, data_seed: int) -> dict:
    """DIR/sweep.json: the grid, and each run's name and swept values (what `summarize` groups by)."""
    return {"grid": grid, "data_seed": data_seed, "cache": str(getattr(cache, "path", cache)),
            "val_cache": str(getattr(val_cache, "path", val_cache)),
            "axes": [key for key in grid if key in jobs[0].swept],
            "runs": [{"name": job.name, "swept": job.swept} for job in jobs]}


# ---- the summary --------------------------------------------------------------------------------
def selected_metrics(run) -> dict | None:
    """A finished run's val metrics at its selected epoch (the best val oIoU, best.safetensors'
    epoch: the first of equal ones), with `epoch`; None while the run is unfinished or had no val."""
    config = run_dir.read_config(run)
    history = run_dir.read_metrics(run)
    if not history or history[-1].get("epoch") != config.get("epochs"):
        return None
    best = None
    for record in history:
        if record.get("val") and (best is None or record["val"]["oIoU"] > best["val"]["oIoU"]):
            best = record
    return None if best is None else dict(best["val"], epoch=best["epoch"])


def summarize(out_dir) -> list[dict]:
    """The rows of DIR/summary.csv: one per cell (the swept values but the seed), in the grid's order,
    with `n_seeds` and `<metric>_mean` / `<metric>_std` (sample std, '' for one seed) of each metric
    at each finished run's selected epoch. Unfinished runs are left out (and from n_seeds)."""
    out_dir = Path(out_dir)
    path = out_dir / SWEEP_FILE
    if not path.is_file():
        raise RefsegError(f"{out_dir} is not a sweep directory (no {SWEEP_FILE})")
    record = json.loads(path.read_text())
    axes = [key for key in record["axes"] if key != "seed"]
    cells: dict[str, tuple[dict, list[dict]]] = {}
    for run in record["runs"]:
        settings = {key: run["swept"][key] for key in axes}
        cell = cells.setdefault(json.dumps(settings), (settings, []))
        folder = out_dir / RUNS / run["name"]
        metrics = selected_metrics(folder) if (folder / run_dir.CONFIG).is_file() else None
        if metrics is not None:
            cell[1].append(metrics)
    return [_row(settings, found) for settings, found in cells.values() if found]


def _row(settings: dict, found: list[dict]) -> dict:
    row = dict(settings, n_seeds=len(found))
    for metric in TABLE_COLUMNS:
        values = [m[metric] for m in found]
        row[f"{metric}_mean"] = statistics.fmean(values)
        row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else ""
    return row


def write_summary(out_dir, rows: list[dict]) -> None:
    """DIR/summary.csv (every value) and DIR/summary.md (mean ± std, 2 decimals)."""
    out_dir = Path(out_dir)
    settings = [key for key in (rows[0] if rows else {}) if key != "n_seeds" and not key.endswith(("_mean", "_std"))]
    columns = settings + ["n_seeds"] + [f"{m}_{stat}" for m in TABLE_COLUMNS for stat in ("mean", "std")]

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell_text(row[k]) for k in columns})
    run_dir.write_text(out_dir / SUMMARY_CSV, table.getvalue())
    header = settings + ["n_seeds"] + list(TABLE_COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell_text(row[k]) for k in settings] + [str(row["n_seeds"])]
        cells += [mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    run_dir.write_text(out_dir / SUMMARY_MD, "\n".join(lines) + "\n")


def mean_std(mean: float, std) -> str:
    """`12.34 ± 0.56`, or `12.34` alone for one seed (std '')."""
    return f"{mean:.2f}" if std == "" or (isinstance(std, float) and math.isnan(std)) else f"{mean:.2f} ± {std:.2f}"


def cell_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return "" if value is None else str(value)
