"""Evaluate a trained head on a cache: `evaluate` (metrics, JSON, per-sample CSV, overlays) and
`predict` (per-sample boolean masks). The scoring, and its protocols `vpd` and `original`, is
heads/scoring.py's, which training's per-epoch validation runs too.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refseg.cache import FeatureDataset
from refseg.cache.fingerprint import check_dataset_unchanged
from refseg.core.cli import warn
from refseg.core.device import resolve_device
from refseg.core.errors import CacheMismatchError, RefsegError, RunError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.metrics import RefSegMetrics
from refseg.core.refer import ReferDataset
from refseg.heads import run_dir
from refseg.heads.batches import remove_sentence
from refseg.heads.caches import as_cache, check_compatible, refuse_incomplete, training_overlap
from refseg.core.paths import check_writable, inside, same_file
from refseg.heads.overlays import OverlayPicker, draw_overlay
from refseg.heads.registry import build_head
from refseg.heads.scoring import score_samples
from refseg.heads.settings import EVAL_BATCH_SIZE, EvalSettings


# ---- one head scored on a dataset ------------------------------------------------------------------
def evaluate_model(model, dataset, *, device, batch_size=EVAL_BATCH_SIZE, workers=0,
                   progress=False) -> tuple[dict, list[dict]]:
    """Protocol `vpd` over `dataset` -> (summary, per-sample [{row, iou, i, u}]) (heads/scoring.py)."""
    metrics, records = RefSegMetrics(), []
    for (scored,) in score_samples([model], dataset, [metrics], device=device, batch_size=batch_size, workers=workers,
                                   progress=progress):
        records.append({"row": scored.row, "iou": scored.iou, "i": scored.intersection, "u": scored.union})
    return metrics.summary(), records


# ---- loading a run against a cache ---------------------------------------------------------------
def load_head(run, checkpoint: str = "best", device="cpu"):
    """Rebuild a run's head from its config.json and load its weights -> (model, config, checkpoint used)."""
    cfg = run_dir.read_config(run)
    path, used = run_dir.checkpoint_path(run, checkpoint)
    try:
        model = build_head(cfg["head"], FeatureSpec.from_dict(cfg["spec"]), **cfg["head_args"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"cannot rebuild head {cfg['head']!r} of {run} from its config.json: {exc}") from None
    state = run_dir.load_weights(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: weights of another head or other head settings
        raise RunError(f"{path} does not fit head {cfg['head']!r} {cfg['head_args']} of {run}: "
                       f"{run_dir.first_mismatch(exc)}") from None
    if missing or unexpected:
        raise RunError(f"{path} does not fit head {cfg['head']!r}: missing {list(missing)[:3]}, "
                       f"unexpected {list(unexpected)[:3]}")
    if cfg.get("text_blind"):  # a text-blind baseline is scored as it was trained: without the sentence
        remove_sentence(model, FeatureSpec.from_dict(cfg["spec"]))
    return model.to(device).eval(), cfg, used


@dataclass
class Caveat:
    """Something that makes these numbers not what they seem: said on stderr, in the table's header
    (`short`) and in the JSON (`key`)."""

    key: str  # "checkpoint", "coverage", "training_samples"
    short: str  # a few words for the table's header
    message: str  # the warning line


@dataclass
class RunOnCache:
    """A run's head loaded to score one cache at one noise level (all checked)."""

    model: torch.nn.Module
    config: dict  # the run's config.json
    checkpoint: str  # the checkpoint used ("best" falls back to "last" without a val cache)
    cache: object
    cache_path: Path
    noise_t: int
    dataset: FeatureDataset
    device: torch.device
    coverage: object = None  # refseg.cache.store.Coverage of the noise level
    caveats: list[Caveat] = field(default_factory=list)


def load_run_on_cache(s: EvalSettings) -> RunOnCache:
    """Check the run against the cache before anything long: settings, noise level, coverage, tensors."""
    device = resolve_device(s.device)
    cfg = run_dir.read_config(s.run)  # a bad run fails before the cache is touched
    cache, cache_path = as_cache(s.cache)
    check_compatible(cfg["cache"]["settings"], cache.extraction_record, f"run {s.run}", str(cache_path))
    noise_t = cfg["noise_t"] if s.noise_t is None else s.noise_t
    if int(noise_t) != int(cfg["noise_t"]) and not s.allow_noise_mismatch:
        raise RefsegError(f"run {s.run} was trained at noise T={cfg['noise_t']} but T={noise_t} was asked for: "
                          "pass --allow-noise-mismatch for a transfer study")
    noise_t = int(noise_t)
    coverage = cache.coverage(noise_t)  # a missing noise level raises the cache's CacheError here
    refuse_incomplete(coverage, cache_path, s.allow_incomplete)
    model, cfg, used = load_head(s.run, s.checkpoint, device)
    missing = [n for n in model.tensor_names if n not in cache.spec]
    if missing:
        raise CacheMismatchError(f"cache {cache_path} lacks {', '.join(missing)}, which head {cfg['head']!r} reads")
    dataset = FeatureDataset(cache_path, noise_t, names=model.tensor_names, text=model.uses_text)
    loaded = RunOnCache(model, cfg, used, cache, cache_path, noise_t, dataset, device, coverage)
    loaded.caveats = _caveats(s, loaded)
    return loaded


def _caveats(s: EvalSettings, loaded: RunOnCache) -> list[Caveat]:
    """What is not what it seems: another checkpoint than asked, part of a noise level, training samples."""
    out = []
    if loaded.checkpoint != s.checkpoint:
        why = "it was trained without --val-cache" if loaded.config.get("val_cache") is None else "the file is missing"
        out.append(Caveat("checkpoint", f"checkpoint {loaded.checkpoint}, not {s.checkpoint}",
                          f"run {s.run} has no {run_dir.CHECKPOINTS[s.checkpoint]} ({why}): evaluating the "
                          f"{loaded.checkpoint} epoch's weights, {run_dir.CHECKPOINTS[loaded.checkpoint]}, instead"))
    c = loaded.coverage
    if not c.complete:
        out.append(Caveat("coverage", f"incomplete cache: {c.describe()} at T={c.noise_t}",
                          f"cache {loaded.cache_path} is incomplete at T={c.noise_t}: evaluating {c.describe()} "
                          "(--allow-incomplete)"))
    why = training_overlap(loaded.config, loaded.cache)
    if why:
        out.append(Caveat("training_samples", "on the run's training samples",
                          f"evaluating run {s.run} on samples it was trained on: cache {loaded.cache_path} {why}; "
                          "these numbers measure the fit to the training data, not generalisation"))
    return out


# ---- the Python API ------------------------------------------------------------------------------
def predict(run, cache, noise_t=None, **options):
    """Per finished sample, {"row", "sent_id", "ref_id", "pred": bool (S, S)} (protocol `vpd`), as an iterator.

    `options`: EvalSettings.PREDICT (checkpoint="best", device="auto", batch_size=16,
    allow_noise_mismatch=False). The run and cache are checked now (errors raise here); predictions
    are computed as you iterate.
    """
    unknown = sorted(set(options) - set(EvalSettings.PREDICT))
    if unknown:
        raise TypeError(f"predict() got an unexpected keyword argument {unknown[0]!r}")
    s = EvalSettings(run=run, cache=cache, noise_t=noise_t, **options)
    s.check()
    loaded = load_run_on_cache(s)
    _warn(loaded.caveats)
    index = loaded.cache.index

    def generate():
        for (scored,) in score_samples([loaded.model], loaded.dataset, [RefSegMetrics()], device=loaded.device,
                                       batch_size=s.batch_size, head_dtype=s.head_dtype):
            row = scored.row
            yield {"row": row, "sent_id": int(index["sent_id"][row]), "ref_id": int(index["ref_id"][row]),
                   "pred": scored.pred}

    return generate()


def evaluate(run, cache, noise_t=None, *, progress=False, **options) -> dict:
    """Metrics of a run on a cache -> summary {"P@0.5".."P@0.9", "oIoU", "mIoU", "n"} (percent).

    `options`: the fields of EvalSettings (protocol="vpd", checkpoint="best", json_out=None, ...).
    """
    return run_evaluation(EvalSettings(run=run, cache=cache, noise_t=noise_t, **options), progress=progress)


def run_evaluation(s: EvalSettings, progress: bool = False) -> dict:
    """`evaluate` from its settings -> the summary."""
    return evaluate_run(s, progress).summary


@dataclass
class Evaluation:
    """What `refseg-eval` reports: the summary, and what the run and cache were."""

    summary: dict
    loaded: RunOnCache


def evaluate_run(s: EvalSettings, progress: bool = False) -> Evaluation:
    """Score a run on a cache: every setting, output path and input checked before the long part."""
    s.check()
    _check_outputs(s)
    loaded = load_run_on_cache(s)
    refer = None
    if s.protocol == "original" or s.overlays:
        refer = _refer_dataset(loaded.cache, s.data_root)  # fail on a missing dataset before the long part
    picker = _overlay_picker(s, loaded) if s.overlays else None  # unknown --overlay-ids fail here too
    _warn(loaded.caveats)  # once every check passed (an error stays one line), before the long part
    index, texts = loaded.cache.index, loaded.cache.texts
    original_gt = _union_masks(refer, index) if s.protocol == "original" else None

    metrics, records = RefSegMetrics(), []
    for (scored,) in score_samples([loaded.model], loaded.dataset, [metrics], device=loaded.device,
                                   batch_size=s.batch_size, progress=progress, original_gt=original_gt,
                                   head_dtype=s.head_dtype):
        row = scored.row
        record = {"sent_id": int(index["sent_id"][row]), "ref_id": int(index["ref_id"][row]), "iou": scored.iou,
                  "i": scored.intersection, "u": scored.union, "image_id": int(index["image_id"][row]),
                  "sentence": texts[row]}
        if picker is not None:
            picker.offer(record["sent_id"], scored.iou, (row, scored.pred, scored.target))
        records.append(record)

    summary = metrics.summary()
    if picker is not None:
        _draw_overlays(s, loaded, refer, picker)
    if s.per_sample:
        _write_csv(s.per_sample, records)
    if s.json_out:
        _write_json(s, loaded, summary)
    return Evaluation(summary, loaded)


# ---- evaluate's pieces ---------------------------------------------------------------------------
def _union_masks(refer, index):
    """row -> the union of its ref's polygons at full resolution, keeping the last ref's mask only."""
    last: dict[int, np.ndarray] = {}

    def target(row) -> np.ndarray:
        ref_id = int(index["ref_id"][row])
        if ref_id not in last:
            last.clear()  # the sentences of a ref are adjacent rows
            last[ref_id] = refer.mask(ref_id, rule="union")
        return last[ref_id]

    return target


def _warn(caveats: list[Caveat]) -> None:
    for caveat in caveats:
        warn(caveat.message)


def _check_outputs(s: EvalSettings) -> None:
    """Refuse, before anything is computed, an output that cannot be written or would overwrite an
    input (the run's files, the cache) or another output."""
    outputs = [(flag, path, directory) for flag, path, directory in (
        ("--json", s.json_out, False), ("--per-sample", s.per_sample, False), ("--overlays", s.overlays, True))
        if path]
    for k, (flag, path, directory) in enumerate(outputs):
        for other_flag, other, _ in outputs[:k]:
            if same_file(path, other):
                raise RefsegError(f"{flag} and {other_flag} are the same path {path}: give each its own")
        for what, source in (("cache", s.cache), ("run", s.run)):
            if isinstance(source, (str, Path)) and _overwrites(Path(path), Path(source), what):
                raise RefsegError(f"{flag} {path} would overwrite the {what} {source}: write it somewhere else")
        check_writable(path, flag, directory=directory)


def _overwrites(path: Path, source: Path, what: str) -> bool:
    """Whether writing `path` replaces input `source` or a file in it. A run folder may take new
    files beside its own (an eval JSON or CSV, as `refseg-report demo` writes there)."""
    if not source.exists() or not inside(path, source):
        return False
    if what == "run" and not same_file(path, source) and same_file(path.parent, source):
        return path.name in (*run_dir.CHECKPOINTS.values(), run_dir.CONFIG, run_dir.METRICS, run_dir.STATE)
    return what != "run" or same_file(path, source)


def _write_json(s: EvalSettings, loaded: RunOnCache, summary: dict) -> None:
    cfg = loaded.config
    info = {
        "summary": summary,
        "run": str(s.run), "head": cfg["head"], "checkpoint": loaded.checkpoint, "protocol": s.protocol,
        "noise_t": loaded.noise_t, "trained_noise_t": cfg["noise_t"],
        "cache": str(loaded.cache_path), "cache_fingerprint": loaded.cache.fingerprint,
        "cache_settings": loaded.cache.extraction_record, "run_cache_fingerprint": cfg["cache"]["fingerprint"],
        "checkpoint_requested": s.checkpoint, "coverage": loaded.coverage.to_dict(),
        # samples extracted with --skip-bad: flagged skipped, never scored (coverage counts them too)
        "skipped_as_bad": [int(x) for x in loaded.cache.index["sent_id"][loaded.cache.skipped(loaded.noise_t)]],
        "on_training_samples": any(c.key == "training_samples" for c in loaded.caveats),
        "warnings": [c.message for c in loaded.caveats],
    }
    Path(s.json_out).parent.mkdir(parents=True, exist_ok=True)
    run_dir.write_json(Path(s.json_out), info)


def _overlay_picker(s: EvalSettings, loaded: RunOnCache):
    """The overlay selection of `s`; sent_ids the cache does not hold are refused before the long part."""
    ids = s.overlay_sent_ids()
    if ids is not None:
        known = {int(x) for x in loaded.cache.index["sent_id"]}
        missing = [str(i) for i in ids if i not in known]
        if missing:
            raise RefsegError(f"--overlay-ids: sent_id {', '.join(missing[:5])} not in cache {loaded.cache_path}")
    return OverlayPicker(s.overlay_pick, s.max_overlays, ids)


def _draw_overlays(s: EvalSettings, loaded: RunOnCache, refer, picker) -> None:
    """One PNG per chosen sample, numbered in the picker's order (best first for --overlay-pick best)."""
    index, texts = loaded.cache.index, loaded.cache.texts
    what = f"{loaded.config['head']} T={loaded.noise_t}"
    for k, (sent_id, iou, (row, pred, target)) in enumerate(picker.chosen()):
        draw_overlay(refer.image_path(int(index["image_id"][row])), pred, target,
                     f"{texts[row]}  (IoU {100 * iou:.1f}; {what})", Path(s.overlays) / f"{k:03d}_sent{sent_id}.png")


# the per-sample CSV: the metric columns first, then where the sample comes from
CSV_COLUMNS = ["sent_id", "ref_id", "iou", "i", "u", "image_id", "sentence"]


def _write_csv(path, records) -> None:
    """Written whole or not at all (a temporary name renamed): a full disk leaves no CSV cut short."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)  # QUOTE_MINIMAL: a sentence with , or " is quoted
    writer.writeheader()
    for r in records:
        writer.writerow(dict(r, iou=f"{r['iou']:.6f}"))
    run_dir.write_text(path, table.getvalue())


def _refer_dataset(cache, data_root):
    ds = cache.extraction_record.get("dataset") or {}
    root = data_root or ds.get("data_root")
    if not root:
        raise RefsegError("the cache does not record its data root: pass --data-root")
    kwargs = {}
    if ds.get("image_root") and data_root is None:
        kwargs["image_root"] = ds["image_root"]
    text_field = ds.get("text_field") or (cache.extraction_record.get("extraction") or {}).get("text_field")
    if text_field:
        kwargs["text_field"] = text_field
    refer = ReferDataset(root, ds.get("dataset"), ds.get("split_by", "unc"), **kwargs)
    # the cache's samples are looked up in these files: refuse files that changed since extraction
    check_dataset_unchanged(cache.path, cache.attrs, refer.refs_path, refer.instances_path)
    return refer
