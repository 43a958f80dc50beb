"""`refseg-compare`: one table across runs and sweeps, grouped by the settings that differ.

```python
from refseg.heads.compare import compare, format_markdown
rows = compare(["sweeps/s1", "runs/vpd-t5"], caches=["val.zarr", "testA.zarr", "testB.zarr"])
print(format_markdown(rows))
```

Each argument is a run directory or a sweep directory (`refseg-sweep --out`, which stands for its
runs). The settings that differ between the runs (head, its arguments, noise level, lr, ..., read
from each run's config.json) are the table's first columns; runs whose settings agree but for the
seed are one row, with the mean ± std (sample std, ddof=1) of each metric over them and their count.

Without caches, the metrics are each run's recorded val metrics at its best val epoch (what
best.safetensors holds). With caches (val, testA, testB, as LAVT's test script takes them), every
run is evaluated on every cache (best checkpoint, protocol vpd; `refseg.heads.evaluate`'s
`load_run_on_cache`, so every check and caveat of refseg-eval applies), the runs of one noise level
scored together on each read of the cache (`score_runs`, heads/scoring.py), and each cache gets its
own metric columns, named by its split (or its file name when splits repeat).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from refseg.cache import FeatureDataset
from refseg.core.cli import say, warn
from refseg.core.errors import RefsegError
from refseg.core.metrics import TABLE_COLUMNS
from refseg.heads import run_dir
from refseg.heads.caches import as_cache
from refseg.heads.evaluate import load_run_on_cache
from refseg.heads.scoring import score
from refseg.heads.settings import CompareSettings, EvalSettings
from refseg.heads.sweep import SWEEP_FILE
from refseg.heads.sweep_grid import RUNS
from refseg.heads.tables import cell_text, csv_text, markdown_table, mean_std
from refseg.heads.train_setup import ABSENT_KEYS

RUNS_PER_PASS = 16  # runs scored together on one read of a cache: their heads are on the device at once

# The config.json keys that make a run's settings, in the table's column order (a key a config.json
# lacks: train_setup.ABSENT_KEYS)
SETTING_KEYS = ("head", "head_args", "text_blind", "noise_t", "optimizer", "lr", "loss", "epochs", "batch_size",
                "max_samples", "data_seed", "seed")


def expand_runs(paths) -> list[Path]:
    """Run directories from `paths`: each a run, or a sweep (its runs, in the grid's order)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / SWEEP_FILE).is_file():
            record = json.loads((path / SWEEP_FILE).read_text())
            found = [path / RUNS / r["name"] for r in record["runs"] if (path / RUNS / r["name"] / run_dir.CONFIG).is_file()]
            if not found:
                raise RefsegError(f"sweep {path} has no runs yet: run its refseg-sweep command first")
            runs += found
        elif path.is_dir() and not (path / run_dir.CONFIG).exists():
            raise RefsegError(f"{path} is neither a head run directory (no {run_dir.CONFIG}) nor a sweep directory "
                              f"(no {SWEEP_FILE})")
        else:
            runs.append(run_dir.require_run(path))
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    return [next(p for p in runs if p.resolve() == u) for u in unique]


def run_settings(config: dict) -> dict:
    """A run's settings, flat: its head arguments by their own names, the training cache by fingerprint."""
    flat = {}
    for key in SETTING_KEYS:
        value = config.get(key, ABSENT_KEYS[key](config) if key in ABSENT_KEYS else None)
        if key == "head_args":
            flat.update({f"{k}": _plain(v) for k, v in sorted((value or {}).items())})
        else:
            flat[key] = _plain(value)
    # the training cache by its fingerprint: one cache under two paths (relative, absolute) is one cache
    flat["cache"] = ((config.get("cache") or {}).get("fingerprint") or "")[:12] or None
    return flat


def _plain(value):
    return "+".join(map(str, value)) if isinstance(value, list) else value


def recorded_metrics(run: Path) -> dict | None:
    """The run's val metrics at its best recorded val epoch (None without val)."""
    best = None
    for record in run_dir.read_metrics(run):
        if record.get("val") and (best is None or record["val"]["oIoU"] > best["val"]["oIoU"]):
            best = record
    return None if best is None else best["val"]


def score_runs(runs: list[Path], cache, device: str = "auto", progress: bool = False) -> list[dict]:
    """Each run's best checkpoint scored on `cache` (protocol vpd, with refseg-eval's checks and caveats)
    -> a summary per run. The runs of one noise level are scored together, RUNS_PER_PASS at a time, on
    one read of the cache (heads/scoring.py); a text-blind run is given no sentence (`load_head`)."""
    by_noise: dict[int, list[int]] = {}
    for k, run in enumerate(runs):
        by_noise.setdefault(int(run_dir.read_config(run)["noise_t"]), []).append(k)
    summaries: list[dict] = [{} for _ in runs]
    passes = [members[i:i + RUNS_PER_PASS] for members in by_noise.values()
              for i in range(0, len(members), RUNS_PER_PASS)]
    for n, members in enumerate(passes, 1):
        loaded = [_loaded(runs[k], cache, device) for k in members]
        say(f"[{n}/{len(passes)}] {cache}: {len(members)} runs at T={loaded[0].noise_t}", enabled=progress)
        models = [run.model for run in loaded]
        names = list(dict.fromkeys(name for model in models for name in model.tensor_names))
        dataset = FeatureDataset(loaded[0].cache_path, loaded[0].noise_t, names=names,
                                 text=any(model.uses_text for model in models))
        for k, metrics in zip(members, score(models, dataset, device=loaded[0].device)):
            summaries[k] = metrics.summary()
    return summaries


def _loaded(run: Path, cache, device: str):
    """The run's best checkpoint on `cache`, checked as refseg-eval checks it; its caveats said on stderr."""
    settings = EvalSettings(run=str(run), cache=cache, device=device)
    settings.check()
    loaded = load_run_on_cache(settings)
    for caveat in loaded.caveats:
        warn(caveat.message)
    return loaded


def cache_labels(caches) -> list[str]:
    """A column prefix per cache: its split, or its file name when two caches share a split."""
    splits = [((as_cache(c)[0].extraction_record.get("dataset") or {}).get("split") or Path(str(c)).stem)
              for c in caches]
    if len(set(splits)) < len(splits):
        return [Path(str(c)).name for c in caches]
    return [str(s) for s in splits]


def compare(paths, caches=(), *, progress: bool = False, **options) -> list[dict]:
    """The table's rows: the differing settings, `n_runs`, then `<metric>_mean` and `<metric>_std`
    (prefixed `<cache> ` per cache when `caches` are given; std '' for one run).

    `options`: the other fields of CompareSettings (device="auto", out=None: also write the table there).
    """
    s = CompareSettings(runs=tuple(paths), caches=tuple(caches), **options)
    s.check()
    rows = run_comparison(s, progress)
    if s.out is not None:
        write_table(rows, s.out)
    return rows


def run_comparison(s: CompareSettings, progress: bool = False) -> list[dict]:
    """`compare`'s rows from its settings (what `refseg-compare` prints); writes nothing."""
    runs, caches, device = expand_runs(s.runs), s.caches, s.device
    configs = [run_dir.read_config(run) for run in runs]
    settings = [run_settings(cfg) for cfg in configs]
    labels = cache_labels(caches) if caches else [None]
    if caches:
        scored = [score_runs(runs, cache, device, progress) for cache in caches]
        metrics = [{label: scores[k] for label, scores in zip(labels, scored)} for k in range(len(runs))]
    else:
        metrics = [{None: recorded_metrics(run)} for run in runs]
    head_arg_keys = sorted({k for cfg in configs for k in (cfg.get("head_args") or {})})
    keys = ["head", *head_arg_keys] + [k for k in (*SETTING_KEYS, "cache") if k not in ("head", "head_args")]
    differ = [k for k in keys if len({json.dumps(flat.get(k)) for flat in settings}) > 1]
    group_keys = [k for k in differ if k != "seed"]
    groups: dict[str, list[int]] = {}
    for i, flat in enumerate(settings):
        groups.setdefault(json.dumps([flat.get(k) for k in group_keys]), []).append(i)
    rows = []
    for members in groups.values():
        row = {k: settings[members[0]].get(k) for k in group_keys}
        row["n_runs"] = len(members)
        for label in labels:
            found = [metrics[i][label] for i in members if metrics[i][label] is not None]
            for metric in TABLE_COLUMNS:
                name = f"{label} {metric}" if label else metric
                values = [m[metric] for m in found]
                row[f"{name}_mean"] = statistics.fmean(values) if values else ""
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else ""
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(setting columns, metric names) of `rows`."""
    first = rows[0] if rows else {}
    settings = [k for k in first if k != "n_runs" and not k.endswith(("_mean", "_std"))]
    metrics = [k[: -len("_mean")] for k in first if k.endswith("_mean")]
    return settings, metrics


def format_markdown(rows: list[dict]) -> str:
    """A Markdown table: the settings, n_runs, and each metric as `mean ± std`."""
    settings, metrics = _columns(rows)
    cells = [[cell_text(row[k]) for k in settings] + [str(row["n_runs"])]
             + ["" if row[f"{m}_mean"] == "" else mean_std(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]
             for row in rows]
    return markdown_table(settings + ["n_runs"] + metrics, cells)


def format_csv(rows: list[dict]) -> str:
    return csv_text(rows, list(rows[0]) if rows else [])


def write_table(rows: list[dict], path) -> None:
    """`path` ending .md (Markdown) or .csv."""
    path = Path(path)
    text = {".md": format_markdown, ".csv": format_csv}[path.suffix.lower()](rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_dir.write_text(path, text)
