"""The extraction pipeline: dataset -> frozen backbone -> Zarr cache.

Work is done in the cheapest order and each piece once:
  stage 1a  VAE once per image            -> images/latent   (skipped for images already done)
  stage 1b  text encoder once per sentence -> text/*, masks/gt
  stage 2   UNet once per (sentence, T)    -> tNNNN/*         (reads the stored latents/embeddings back)
Stage 2 always starts from the *stored* (float16 by default) latent and embedding, so a noise level added later to
an existing store gets exactly the bytes it would have got in the first run, and the VAE and text
encoder never run again.

Every stage runs on one skeleton, `Extraction.run_stage`: claim shards, compute their rows batch by
batch (the stage's own step: `latents`, `text`, `features`), write each shard whole, release. The
stages themselves are small types (extract/stages.py).

Determinism: samples are sorted by (image_id, sent_id); ε comes from a generator seeded by
(noise seed, image_id, T); shards are written whole. The bytes written do not depend on
`--batch-size`, on interruption/resume, or on `--shard i/n`.

Several processes may fill one store (`--shard i/n`, torchrun ranks): each claims the shards it
computes (cache/lock.py), so two never write the same shard, and stage 1 is finished by all of them
together before the UNet stage, which needs every latent its samples use.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from refseg.backbones.loading import Backbone, load_backbone
from refseg.cache.fingerprint import dataset_sha256
from refseg.cache.writer import CacheWriter
from refseg.core.cli import say
from refseg.core.os_errors import describe_os_error, is_path_error
from refseg.core.paths import check_output_path
from refseg.core.errors import CacheError, CacheWriteError, DataError, NonFiniteError
from refseg.core.feature_spec import FeatureSpec
from refseg.core.noise import NoiseInput, make_noise, noise_latents
from refseg.core.precision import ieee_float32
from refseg.core.refer import ReferDataset
from refseg.core.transforms import image_to_tensor, load_image, mask_to_size
from refseg.backbones.families import TextConditioning
from refseg.extract.checks import advice, check_features, feature_stats
from refseg.extract.config import ExtractionConfig
from refseg.extract.host_copy import HostCopies
from refseg.extract.inputs import SelectedTables, count_truncated, selected_samples
from refseg.extract.plan import DryRun, check_space, plan_extraction
from refseg.extract.report import ExtractionReport
from refseg.extract.resolve import resolve_extraction
from refseg.extract.shard_buffer import ShardBuffer, StageWrites, rows_of
from refseg.extract.stages import LATENTS, TEXT, NoiseLevel, Stage, StageResult

WAIT_POLL_SECONDS = 1.0  # how often a process waiting for other processes' stage 1 looks again
# On CUDA, copy each batch's results to host memory on a side stream while the next batch computes
# (extract/host_copy.py); False = synchronous copies, for bench/extract.py to measure the difference.
OVERLAP_HOST_COPIES = True


def run_extraction(cfg: ExtractionConfig, backbone: Backbone | None = None) -> "ExtractionReport | DryRun":
    """Extract features for every noise level in `cfg.noise_ts` into `cfg.out` (resumable).

    Several processes may run this on one store at once, each with its own `cfg.shard` part (or the
    same part: then they share its shards). Stage 1 (latents, embeddings) is finished by all of them
    together before any runs its UNet stage (`Extraction.finish_stage_one`). The numbered steps are
    those of docs/ARCHITECTURE.md's path of one sample.
    """
    t_start = time.perf_counter()
    # 1. Dataset -> samples: the settings and --out checked before anything is read, then the samples
    #    in cache order and their tables
    cfg.check()
    check_output_path(cfg.out, "cache")
    refer, tables = selected_samples(cfg)
    # 2. Backbone and spec: the run resolved once; what it will write against the free space (a store
    #    that cannot fit is refused before any work; --dry-run stops here)
    if backbone is None:
        backbone = load_backbone(cfg.model, model_config=cfg.model_config, device=cfg.device, dtype=cfg.dtype)
    resolved = resolve_extraction(cfg, backbone)
    plan = plan_extraction(resolved, tables)
    if cfg.dry_run:
        return DryRun(plan)
    if not cfg.no_space_check:
        check_space(plan)
    report = ExtractionReport(len(tables.samples), len(tables.image_paths), resolved.level_keys,
                              truncated=count_truncated(backbone.family.map_tokenizer(backbone.components),
                                                        tables.samples.text, cfg.token_length))
    try:
        # 3. Open the store: a new one, or the one there if its fingerprint is the same (resume)
        store = resolved.new_store(tables, dataset_sha256(refer.refs_path, refer.instances_path))
        writer = CacheWriter.open(cfg.out, store, overwrite=cfg.overwrite)
        report.dataset_changed = writer.dataset_changed
        with writer, ieee_float32(backbone.device, backbone.dtype):  # --dtype fp32 is fp32 on a GPU too
            run = Extraction(resolved.cfg, backbone, resolved.spec, writer, refer, tables, report)
            # 4. Image -> latent and 5. sentence -> embedding, GT: this process's part, then what no process holds
            run.run_stage(LATENTS, run.latents, cfg.shard)
            run.run_stage(TEXT, run.text, cfg.shard)
            run.finish_stage_one()
            # 6. Latent -> features and attention at each noise level; then what other processes still hold
            for noise in resolved.levels:
                run.noise_level(noise)
            report.incomplete = {level: todo for level in resolved.level_keys
                                 if (todo := len(writer.stage(level).todo()))}
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc}{advice(exc, backbone.dtype)}") from None
    except CacheError:
        raise  # a CacheWriteError is an OSError too, and already says what to do
    except OSError as exc:
        raise _write_error(cfg.out, exc) from exc
    report.bad = run.bad_by_sent_id()
    report.seconds = time.perf_counter() - t_start
    return report


def _write_error(out: str, exc: OSError) -> CacheError:
    """A failed write of the store, said by its cause: a path the user cannot write (choose another), or
    a disk that is full or failing (free space or fix it, then resume)."""
    if is_path_error(exc):
        return CacheError(f"cannot write cache {out}: {describe_os_error(exc)}: a bad path or a missing permission, "
                          "not a full disk; choose another --out or fix the folder's permissions")
    return CacheWriteError.from_os_error(out, exc)


# --------------------------------------------------------------------------------------------------
# The run's state and the stages' skeleton


@dataclass
class Extraction:
    """One run's state: settings, backbone, store, tables, report, and the rows found bad (--skip-bad).

    `run_stage` is what every stage shares; a stage's own work is one compute step, `compute(rows,
    add)`, which calls `add(row, arrays, skipped=False)` once per row it computes.
    """

    cfg: ExtractionConfig
    backbone: Backbone
    spec: FeatureSpec
    writer: CacheWriter
    refer: ReferDataset
    tables: SelectedTables
    report: ExtractionReport
    bad_images: dict[int, str] = field(default_factory=dict)  # image row -> reason
    bad_samples: dict[int, str] = field(default_factory=dict)  # sample row -> reason

    @torch.inference_mode()
    def run_stage(self, stage: Stage, compute: Callable, part: tuple[int, int] = (0, 1)) -> StageResult:
        """Compute and store the unfinished shards of `part` (i, n) of `stage` that no other process holds.

        Asks the store for the stage's handle once: claims the shards, computes their rows, hands each
        shard to the writer thread as soon as its last row is added (`ShardBuffer`), and releases the
        claims once everything handed over is written.
        """
        # the pipeline refused non-finite features on the device already (extract/checks.py)
        store = self.writer.stage(stage.key, finite_checked=isinstance(stage, NoiseLevel))
        with StageWrites(store, store.todo(part)) as claimed:
            rows = rows_of(claimed.mine)
            self.report.rows_computed[stage] = self.report.rows_computed.get(stage, 0) + len(rows)
            if rows:
                def write(shard: slice, arrays: dict, skipped: np.ndarray) -> None:  # on the writer thread
                    store.write(shard, arrays, skipped)
                    buffer.release(arrays)  # on disk now: the next shard's rows may go into these arrays

                buffer = ShardBuffer(claimed.mine, lambda shard, arrays, skipped: claimed.io.submit(
                    write, shard, arrays, skipped))
                bar = tqdm(total=len(rows), desc=stage.title, unit=stage.unit, disable=not self.cfg.progress)

                def add(row: int, arrays: dict[str, np.ndarray], skipped: bool = False, count: int | None = None) -> None:
                    """One row, or with `count` that many consecutive rows, none skipped (arrays hold `count` rows)."""
                    if count is None:
                        buffer.add(row, arrays, skipped)
                    else:
                        buffer.add_rows(row, arrays, count)
                    if skipped:  # bad input stored as zeros: not computed
                        self.report.rows_computed[stage] -= 1
                        self.report.rows_skipped[stage] = self.report.rows_skipped.get(stage, 0) + 1
                    bar.update(1 if count is None else count)

                compute(rows, add)
                bar.close()
        return StageResult(computed=len(rows), held_by_others=len(claimed.others))

    def finish_stage_one(self) -> None:
        """Return once every image and sentence of the store has its latent and embedding.

        The UNet stage of this process's samples reads latents and embeddings that other processes (the
        other --shard parts) may be writing. A shard that no process holds (its process died, or has not
        started yet) is computed here; shards that other processes hold are waited for, up to
        `cfg.wait_timeout` seconds. A remote store has no locks: there this only waits.
        """
        deadline = time.monotonic() + self.cfg.wait_timeout
        said = False
        while True:
            images, texts = self.writer.stage(LATENTS.key).todo(), self.writer.stage(TEXT.key).todo()
            if not images and not texts:
                return
            if self.writer.has_locks:
                held = (self.run_stage(LATENTS, self.latents).held_by_others
                        + self.run_stage(TEXT, self.text).held_by_others)
                if held < len(images) + len(texts):
                    continue  # something was computed here: look again
            if time.monotonic() > deadline:
                raise self._waited_too_long(images, texts)
            if not said:
                say(f"waiting for other processes to store {len(images)} image shards and {len(texts)} "
                    "sentence shards ...", enabled=self.cfg.progress)
                said = True
            time.sleep(WAIT_POLL_SECONDS)

    def _waited_too_long(self, images: list[slice], texts: list[slice]) -> CacheError:
        missing_images = sum(s.stop - s.start for s in images)
        missing_texts = sum(s.stop - s.start for s in texts)
        return CacheError(
            f"waited {self.cfg.wait_timeout:g} s for the other processes writing {self.cfg.out}: it still lacks the "
            f"latents of {missing_images}/{self.writer.n_images} images and the embeddings of {missing_texts}/"
            f"{self.writer.n_samples} sentences, which this process's UNet stage needs; check that the other "
            "--shard parts are running (or raise --wait-timeout); what is written is kept, rerun to resume")

    def noise_level(self, noise: NoiseInput) -> None:
        """Stage 2 at one noise level for this process's part; shards other processes hold are left to them."""
        stage = NoiseLevel(noise)
        self.writer.add_noise_level(stage.t, noise=noise)
        result = self.run_stage(stage, functools.partial(self.features, stage), self.cfg.shard)
        if result.held_by_others:
            self.report.shards_left[stage] = result.held_by_others

    def bad_by_sent_id(self) -> dict[int, str]:
        """sent_id -> reason for every sample found bad in this run (the samples of a bad image included)."""
        samples = self.tables.samples
        bad = dict(self.bad_samples)
        for row in np.flatnonzero(np.isin(samples.image_row, list(self.bad_images))):
            bad.setdefault(int(row), self.bad_images[int(samples.image_row[row])])
        return {int(samples.sent_id[r]): why for r, why in bad.items()}

    # ---- stage 1a: images -> latents ---------------------------------------------------------------

    def latents(self, rows: list[int], add: Callable) -> None:
        """The VAE latent of each image row; zeros for an image that cannot be read (--skip-bad)."""
        backbone, cfg, samples, image_ids = self.backbone, self.cfg, self.tables.samples, self.tables.images.image_id
        scale = backbone.scaling_factor if cfg.latent_scaling == "sd" else 1.0
        shift = backbone.shift_factor if cfg.latent_scaling == "sd" else None  # SD3/FLUX: z = (x - shift) * scale
        side = cfg.image_size // backbone.vae_scale_factor
        zeros = np.zeros((backbone.vae.config.latent_channels, side, side), self.writer.float_dtype)
        images = _ImageRows(rows, self.tables.image_paths, cfg.image_size)
        for batch, xs, errors in _loader(images, cfg.batch_size, cfg.workers, pin=backbone.device.type == "cuda"):
            unreadable = self._unreadable(batch, errors)
            x = xs.to(backbone.device, non_blocking=True).to(backbone.dtype)
            z0 = batch_invariant(backbone, lambda b: backbone.vae.encode(b).latent_dist.mode(), x)
            z0 = (z0 if shift is None else z0 - shift) * scale
            z0 = z0.to(self._storage_dtype).cpu().numpy()
            if not np.isfinite(z0).all():
                bad = [int(image_ids[r]) for r, z in zip(batch, z0) if not np.isfinite(z).all()]
                raise NonFiniteError(f"non-finite VAE latent for image_id {bad[0]}")
            for row, reason in unreadable.items():
                # recorded before the shard is written: whoever sees it done also sees its bad samples
                self.writer.record_bad([int(s) for s in samples.sent_id[samples.image_row == row]], reason)
            self.bad_images.update(unreadable)
            for row, z in zip(batch, z0):
                bad = row in self.bad_images  # stored as zeros, flagged in the root's "bad" list
                add(row, {"latent": zeros if bad else z}, skipped=bad)

    def _unreadable(self, batch: list[int], errors: list[str]) -> dict[int, str]:
        """Image row -> reason for the images of `batch` that could not be read; an error without --skip-bad."""
        unreadable = {row: err for row, err in zip(batch, errors) if err}
        if unreadable and not self.cfg.skip_bad:
            row, err = next(iter(unreadable.items()))
            image_id = int(self.tables.images.image_id[row])
            raise DataError(f"image_id {image_id} ({self.tables.image_paths[row]}): {err} (use --skip-bad to skip it)")
        return unreadable

    # ---- stage 1b: sentences -> token ids, embeddings; GT masks ------------------------------------

    def text(self, rows: list[int], add: Callable) -> None:
        """Tokens and text embedding of each sentence row, and its ref's ground-truth mask."""
        backbone, samples = self.backbone, self.tables.samples
        masks: dict[int, np.ndarray] = {}  # ref_id -> mask at S×S; refs' sentences are adjacent-ish
        for batch in _batches(rows, self.cfg.batch_size):
            bad = self._empty_sentences(batch)
            prompts = ["" if self.cfg.prompt == "empty" else samples.text[row] for row in batch]
            tok = backbone.tokenize(prompts, self.cfg.token_length)
            keys = list(tok)

            def encode(*tensors):  # through the text adapter, if any
                text = backbone.encode(dict(zip(keys, tensors)))
                return {"embedding": text.embedding, **({} if text.pooled is None else {"pooled": text.pooled})}

            encoded = batch_invariant(backbone, encode, *(tok[k].to(backbone.device) for k in keys))
            emb = encoded["embedding"].to(self._storage_dtype).cpu().numpy()
            pooled = encoded["pooled"].to(self._storage_dtype).cpu().numpy() if "pooled" in encoded else None
            self._load_masks(batch, masks, bad)
            if bad:  # recorded before the shard is written (see `latents`)
                rows_bad = sorted(bad)
                self.writer.record_bad([int(samples.sent_id[r]) for r in rows_bad], [bad[r] for r in rows_bad])
                self.bad_samples.update(bad)
            for j, row in enumerate(batch):
                add(row, skipped=row in bad, arrays={"input_ids": tok["input_ids"][j].numpy().astype(np.int32),
                          "attention_mask": tok["attention_mask"][j].numpy().astype(np.uint8),
                          "embedding": emb[j],
                          "gt": masks[int(samples.ref_id[row])],
                          **({} if pooled is None else {"pooled": pooled[j]})})

    def _empty_sentences(self, batch: list[int]) -> dict[int, str]:
        """Row -> reason for the empty sentences of `batch`; an error without --skip-bad."""
        samples = self.tables.samples
        empty = {row: "empty sentence" for row in batch if not samples.text[row].strip()}
        if empty and not self.cfg.skip_bad:
            row = next(iter(empty))
            raise DataError(f"sent_id {int(samples.sent_id[row])} (ref {int(samples.ref_id[row])}) has an empty "
                            "sentence (use --skip-bad to skip it)")
        return empty

    def _load_masks(self, batch: list[int], masks: dict[int, np.ndarray], bad: dict[int, str]) -> None:
        """Add the GT mask of each ref of `batch` not in `masks`; one that cannot be made is zeros (--skip-bad)."""
        size = self.cfg.image_size
        for row in batch:
            ref_id = int(self.tables.samples.ref_id[row])
            if ref_id in masks:
                continue
            try:
                masks[ref_id] = mask_to_size(self.refer.mask(ref_id, rule=self.cfg.mask_rule), size)
            except DataError as exc:
                if not self.cfg.skip_bad:
                    raise
                bad.setdefault(row, str(exc))
                masks[ref_id] = np.zeros((size, size), np.uint8)

    # ---- stage 2: UNet per (sentence, T) ----------------------------------------------------------

    def features(self, stage: NoiseLevel, rows: list[int], add: Callable) -> None:
        """The UNet's features of each row of noise level `stage.t`, from its stored latent and embedding;
        zeros, flagged skipped, for a row found bad in stage 1 (by any process).

        A row is a sample, or in a per-image level (`--prompt empty`, `CacheWriter.per_image`) an image,
        computed from its first sentence (every sentence of it has the empty prompt and the image's ε).
        """
        names = [ti.name for ti in self.spec.tensors]
        zeros = {ti.name: np.zeros(ti.shape, self.writer.float_dtype) for ti in self.spec.tensors}
        skip = set(int(r) for r in self.writer.bad_rows())  # sample rows recorded as bad
        sample_of = np.arange(self.writer.n_samples)  # level row -> the sample row it is computed from
        if self.writer.per_image(stage.t):
            samples = self.tables.samples
            _, first = np.unique(samples.image_row, return_index=True)
            sample_of = first
            # an image is skipped when none of its sentences can be used (its image could not be read)
            skip = {int(i) for i in range(self.writer.n_images)
                    if all(int(r) in skip for r in np.flatnonzero(samples.image_row == i))}
            skip_samples = {int(first[i]) for i in skip}
        else:
            skip_samples = skip
        copies = HostCopies(self.backbone.device, overlap=OVERLAP_HOST_COPIES)

        def store(batch, computed, source, pending):  # the host side of a batch: checks, then rows into shards
            host = copies.finish(pending)
            check_features(names, host, computed, stage.t, self.tables.samples, skip_samples,
                           limit=float(np.finfo(self.writer.float_dtype).max))
            consecutive = np.array_equal(batch, np.arange(batch[0], batch[0] + len(batch)))
            if consecutive and np.array_equal(source, np.arange(len(batch))) and not skip.intersection(batch.tolist()):
                add(int(batch[0]), {name: host[name] for name in names}, count=len(batch))  # whole shards: no copy
                return
            for j, row in enumerate(batch):
                row = int(row)
                if row in skip:
                    add(row, zeros, skipped=True)
                else:
                    add(row, {name: host[name][source[j]] for name in names})

        # Software-pipelined: batch i+1 is queued on the device before batch i is stored on the host
        # (extract/host_copy.py); on the CPU this is the plain sequential loop.
        in_flight = None
        with self.backbone.capture(self.spec) as capture:  # the family's (UNets: backbones/capture.py)
            for batch in _batches(rows, self.cfg.batch_size):
                batch = np.array(batch)
                computed, source = self._rows_to_compute(sample_of[batch])
                pending = copies.start(self._unet(stage, capture, copies, computed, names))
                if in_flight is not None:
                    store(*in_flight)
                in_flight = (batch, computed, source, pending)
            if in_flight is not None:
                store(*in_flight)

    def _rows_to_compute(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `batch` the denoiser runs on, and for each row of `batch` the index of the one whose
        features it takes. With --prompt empty every sentence of an image has the same condition (the
        empty prompt) and the same ε (seeded by the image), so the denoiser runs once per image of the
        batch and its sentences share the result: the bytes one run per sentence gives, since a CPU
        batch is computed one sample at a time (tests/test_empty_prompt.py); ~5x less work on RefCOCO."""
        if self.cfg.prompt != "empty":
            return batch, np.arange(len(batch))
        _, first, source = np.unique(self.tables.samples.image_row[batch], return_index=True, return_inverse=True)
        return batch[first], source

    def _unet(self, stage: NoiseLevel, capture, copies: HostCopies, batch: np.ndarray,
              names: list[str]) -> dict[str, torch.Tensor]:
        """Queue the denoiser on the device for sample rows `batch`: the features `names` in the store's type
        and their `feature_stats`, taken before the conversion (an overflow is inf after it).

        ε is seeded by the store group's T (`stage.t`), so a level's noise is the same whichever flag named it.
        """
        samples, t, noise = self.tables.samples, stage.t, stage.noise
        z0 = torch.from_numpy(self.writer.latents(samples.image_row[batch])).float()
        eps = torch.stack([make_noise(tuple(z0.shape[1:]), self.cfg.noise_seed, int(samples.image_id[r]), t)
                           for r in batch])
        zt = copies.to_device(noise_latents(z0, noise, eps), self.backbone.dtype)
        emb = copies.to_device(torch.from_numpy(self.writer.embeddings(batch)), self.backbone.dtype)
        stored_pooled = self.writer.pooled(batch)
        pooled = () if stored_pooled is None else (copies.to_device(torch.from_numpy(stored_pooled), self.backbone.dtype),)

        def run(zt, emb, *pooled):
            return capture.run(zt, noise, TextConditioning(emb, pooled[0] if pooled else None))

        captured = batch_invariant(self.backbone, run, zt, emb, *pooled)
        return {**{name: captured[name].to(self._storage_dtype) for name in names}, **feature_stats(captured, names)}

    @functools.cached_property
    def _storage_dtype(self) -> torch.dtype:
        """The store's float type (float16, or float32 with --cache-dtype fp32), as a torch dtype."""
        return torch.float32 if self.writer.float_dtype == np.float32 else torch.float16


# --------------------------------------------------------------------------------------------------
# Pieces of the stages


class _ImageRows(torch.utils.data.Dataset):
    """Decodes and resizes images in DataLoader workers; a bad image is reported, not raised, so the
    main process decides (error naming the sample, or --skip-bad)."""

    def __init__(self, rows: list[int], paths: list[str], size: int):
        self.rows, self.paths, self.size = rows, paths, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            # target_size lets a huge JPEG decode at a reduced scale (bounded memory); images under
            # 4x the target size, i.e. all usual data, decode exactly as without it
            x = image_to_tensor(load_image(self.paths[row], target_size=self.size), self.size)
            return row, x, ""
        except (DataError, OSError) as exc:
            return row, torch.zeros(3, self.size, self.size), str(exc) or type(exc).__name__


def _collate_images(items) -> tuple[list[int], torch.Tensor, list[str]]:
    rows, xs, errors = zip(*items)
    return list(rows), torch.stack(xs), list(errors)  # stacked in the worker, so the batch is pinned whole


def _loader(dataset, batch_size: int, workers: int, pin: bool = False):
    """Images decoded and resized in `workers` processes; on CUDA the batches arrive in pinned memory,
    so the copy to the device overlaps the VAE's work instead of waiting for it."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate_images, persistent_workers=False, pin_memory=pin,
    )


def batch_invariant(backbone: Backbone, fn, *batch: torch.Tensor):
    """`fn(*batch)`, computed so that each sample's result does not depend on the batch it came in.

    On CPU, oneDNN convolutions and MKL's small-matrix GEMMs (the time-embedding layers see M = batch
    rows) round differently for different batch sizes, which would make the cache's bytes depend on
    --batch-size; so on CPU the backbone runs one sample at a time. On a GPU the batch runs whole:
    there the bytes are reproducible for a given --batch-size (and across resume and --shard), and
    differ from another batch size by float16 rounding at most.
    """
    if backbone.device.type != "cpu" or len(batch[0]) == 1:
        return fn(*batch)
    parts = [fn(*(x[i:i + 1] for x in batch)) for i in range(len(batch[0]))]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _batches(rows: list[int], size: int):
    return (rows[start:start + size] for start in range(0, len(rows), size))
