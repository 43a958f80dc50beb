"""One pass, many heads: `refseg-sweep` trains every combination of a grid, and the heads that share
a batch stream share each batch (DINOv2's linear evaluation trains its many heads on one forward).

```python
from refseg.heads.sweep import run_sweep, summarize
rows = run_sweep({"head": ["vpd", "film"], "seed": [0, 1, 2], "noise_t": [0, 5], "hidden": 64, "epochs": 12},
                 "train.zarr", "val.zarr", "sweeps/s1")
```

The grid (heads/sweep_grid.py): each key a `refseg-train-head` option in snake case, a list a swept
axis, a scalar fixed; it is checked and expanded into one job per head before anything is written.

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

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from refseg.core.cli import say, warn
from refseg.core.device import resolve_device
from refseg.core.errors import RefsegError, RunWriteError
from refseg.core.memory import available_memory
from refseg.core.metrics import TABLE_COLUMNS
from refseg.core.paths import check_writable
from refseg.core.processes import run_in_processes
from refseg.heads import run_dir, train_setup
from refseg.heads.caches import as_cache
from refseg.heads.distributed import Ranks
from refseg.heads.settings import SweepSettings
from refseg.heads.sweep_grid import RUNS, Job, expand, load_grid
from refseg.heads.sweep_plan import plan
from refseg.heads.tables import cell_text, csv_text, markdown_table, mean_std
from refseg.heads.train import run_epochs

SWEEP_FILE = "sweep.json"  # the grid and data seed of the sweep in DIR (what `summarize` reads)
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
RESUME_ADVICE = ("the heads' completed epochs are kept: {remedy}, then rerun the same refseg-sweep command (it "
                 "resumes each head after its last completed epoch)")


# ---- running it ---------------------------------------------------------------------------------
def run_sweep(grid: dict, cache, val_cache, out, *, progress: bool = True, threads: int | None = None,
              memory_budget: int | None = None, **options) -> list[dict]:
    """Train every head of `grid` on `cache` (validating on `val_cache`) into `out`; -> the summary rows.

    `options`: the other fields of SweepSettings (data_seed=0, processes=1, dry_run=False). Rerun it to
    resume. `threads`: torch CPU threads while it runs (default: as they are), shared out among
    `processes` local CPU processes that split the heads (module docstring). The heads train in passes
    that fit `memory_budget` bytes (default: half the available RAM; heads/sweep_plan.py); `dry_run`
    prints that plan and writes nothing.
    """
    settings = SweepSettings(cache=cache, val_cache=val_cache, grid=grid, out=out, **options)
    return run_sweep_settings(settings, progress=progress, threads=threads, memory_budget=memory_budget)


def run_sweep_settings(s: SweepSettings, *, progress: bool = True, threads: int | None = None,
                       memory_budget: int | None = None) -> list[dict]:
    """`run_sweep` from its settings (what `refseg-sweep` runs); `s.grid` a GRID.yaml path or the grid."""
    s.check()
    grid = s.grid if isinstance(s.grid, dict) else load_grid(s.grid)
    cache, val_cache, out, data_seed, processes = s.cache, s.val_cache, s.out, s.data_seed, s.processes
    jobs = expand(grid, cache, val_cache, out, data_seed=data_seed)
    check_writable(out, "--out", directory=True)
    specs = _check_data(jobs)
    out = Path(out)
    ranks = Ranks.from_env()
    _check_processes(processes, ranks, jobs)
    if s.dry_run:
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
        warn(f"{len(failed)} of {len(jobs)} heads diverged and stopped early ({', '.join(failed)}); the summary "
             "leaves them out")
    return rows


def _check_data(jobs: list[Job]) -> dict:
    """The caches open, hold the noise levels, and every kind of head can be built on them: before anything
    is written (each distinct head once: a grid of thousands of seeds builds a few). -> cache path -> spec."""
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
            train_setup.build_for_training(job.settings, job.head_args, opened[str(job.settings.cache)].spec)
        except RefsegError as exc:
            raise RefsegError(f"run {job.name}: {exc}") from None
        built.add(kind)
    return {key: cache.spec for key, cache in opened.items()}


def _finished(job: Job) -> bool:
    return run_dir.completed_epoch(job.settings.out) >= job.settings.epochs


def _budget(processes: int) -> int | None:
    """Bytes one process's passes may take: half the available RAM, shared among the local processes."""
    available = available_memory()
    return None if available is None else available // 2 // max(1, processes)


def _check_processes(processes: int, ranks, jobs: list[Job]) -> None:
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
    shares = [jobs[i::processes] for i in range(processes)]
    calls = [(share, threads, progress and i == 0, specs, budget) for i, share in enumerate(shares) if share]
    return [name for names in run_in_processes(_train_share, calls) for name in names]


def _train_share(jobs: list[Job], threads: int, progress: bool, specs: dict, budget: int | None) -> list[str]:
    """One local process's part of a sweep (runs in a spawned process)."""
    torch.set_num_threads(threads)
    return _train(jobs, Ranks(), progress, specs, budget)


def _start_ranks(ranks) -> None:
    """Under torchrun: the process group, for the barriers only (no tensor crosses ranks)."""
    if ranks.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
        ranks.owns_group = True


def _train(jobs: list[Job], ranks, progress: bool, specs: dict, budget: int | None) -> list[str]:
    """Train this rank's jobs in the passes of their plan (heads/sweep_plan.py); -> the heads that diverged."""
    the_plan = plan(jobs, specs, {job.name for job in jobs if _finished(job)}, budget)
    say(the_plan.lines()[0], enabled=progress)  # the sweep's own progress: its plan, then each pass
    failed, trained, started = [], the_plan.done, time.monotonic()
    for k, todo in enumerate(the_plan.passes, 1):
        s = todo[0].settings
        say(f"sweep pass {k}/{len(the_plan.passes)}: T={s.noise_t}, {len(todo)} heads ({trained} of {the_plan.jobs} "
            f"heads done before it{_eta(started, trained - the_plan.done, the_plan)})", enabled=progress)
        trained += len(todo)
        device = s.device
        if ranks.active and resolve_device(device).type == "cuda":
            device = f"cuda:{ranks.local_rank}"  # each rank its own GPU
        runs = [(dataclasses.replace(job.settings, device=device, resume=run_dir.has_entries(job.settings.out)),
                 job.head_args) for job in todo]
        state = train_setup.set_up_heads(runs, progress, ranks=Ranks(), labelled=True)
        try:
            run_epochs(state, keep_going=True)
        except Exception:  # (not Ctrl-C: its line says the sweep resumes)
            train_setup.abandon_untrained(state)  # the pass's new runs that completed no epoch leave no folder behind
            raise
        finally:
            state.release()
        failed += [job.name for job, head in zip(todo, state.heads) if head.failed]
    return failed


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
    run_dir.write_text(out_dir / SUMMARY_CSV, csv_text(rows, columns))
    cells = [[cell_text(row[k]) for k in settings] + [str(row["n_seeds"])]
             + [mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in TABLE_COLUMNS] for row in rows]
    run_dir.write_text(out_dir / SUMMARY_MD, markdown_table(settings + ["n_seeds"] + list(TABLE_COLUMNS), cells))
