"""The extraction pipeline: dataset -> frozen backbone -> Zarr cache.

Work is done in the cheapest order and each piece once:
  stage 1a  VAE once per image            -> images/latent   (skipped for images already done)
  stage 1b  text encoder once per sentence -> text/*, masks/gt
  stage 2   UNet once per (sentence, T)    -> tNNNN/*         (reads the stored latents/embeddings back)
Stage 2 always starts from the *stored* float16 latent and embedding, so a noise level added later to
an existing store gets exactly the bytes it would have got in the first run, and the VAE and text
encoder never run again.

Determinism: samples are sorted by (image_id, sent_id); ε comes from a generator seeded by
(noise seed, image_id, T); shards are written whole. The bytes written do not depend on
`--batch-size`, on interruption/resume, or on `--shard i/n`.

Several processes may fill one store (`--shard i/n`, torchrun ranks): each claims the shards it
computes (cache/lock.py), so two never write the same shard, and stage 1 is finished by all of them
together before the UNet stage, which needs every latent its samples use.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from refseg.cache import layout
from refseg.cache.layout import ImageTable, SampleTable
from refseg.cache.writer import CacheWriteError, CacheWriter
from refseg.extract.capture import UNetCapture
from refseg.extract.host_copy import HostCopies
from refseg.extract.shard_buffer import BackgroundWriter, ShardBuffer
from refseg.backbones.loading import Backbone, load_backbone
from refseg.core.errors import CacheError, DataError, NonFiniteError, RefsegError
from refseg.core.feature_spec import DEFAULT_ATTN_STRIDES, DEFAULT_STRIDES
from refseg.core.noise import add_noise, alphas_cumprod, make_noise
from refseg.core.refer import ReferDataset
from refseg.core.transforms import image_to_tensor, load_image, mask_to_size


@dataclass
class ExtractionConfig:
    """Every setting of one extraction run (the CLI fills it from flags)."""

    data_root: str
    dataset: str
    split: str
    out: str
    model: str = "tiny"
    noise_ts: tuple[int, ...] = (0,)
    split_by: str = "unc"
    image_root: str | None = None
    model_config: str | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    image_size: int = 512
    token_length: int = 40
    limit: int | None = None
    sentences: str = "all"  # "all" | "first" (the first sentence of each ref)
    strides: tuple[int, ...] = DEFAULT_STRIDES
    attn_strides: tuple[int, ...] = DEFAULT_ATTN_STRIDES
    timestep: int | None = None  # UNet timestep; None -> T
    latent_scaling: str = "sd"  # "sd" (times vae scaling_factor) | "none" (VPD)
    noise_seed: int = 0
    text_field: str = "sent"
    mask_rule: str = "vpd"
    shard_size: int | None = None  # None -> cache default
    codec: str = "none"
    workers: int = 0
    shard: tuple[int, int] = (0, 1)  # this process's part (i, n) of the shards
    wait_timeout: float = 3600.0  # seconds to wait for other processes' latents/embeddings (see finish_stage_one)
    overwrite: bool = False
    skip_bad: bool = False
    progress: bool = True


@dataclass
class ExtractionReport:
    n_samples: int
    n_images: int
    noise_ts: tuple[int, ...]
    computed: dict = field(default_factory=dict)  # stage -> rows computed in this run
    truncated: int = 0  # sentences longer than --token-length (counted over all selected samples)
    bad: dict = field(default_factory=dict)  # sent_id -> reason (with --skip-bad)
    left_to_others: dict = field(default_factory=dict)  # stage -> shards another process was writing
    incomplete: dict = field(default_factory=dict)  # noise level -> shards not finished when this run ended
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"cache: {self.n_samples} samples, {self.n_images} images, noise levels {list(self.noise_ts)}"]
        for stage, n in self.computed.items():
            out.append(f"  {stage}: {n} computed this run")
        for stage, n in self.left_to_others.items():
            out.append(f"  {stage}: {n} shards left to another process writing this store")
        if self.incomplete:
            levels = ", ".join(f"T={t}: {n} shards" for t, n in sorted(self.incomplete.items()))
            out.append(f"  not complete yet ({levels} to do): other --shard parts still to run or running")
        out.append(f"  sentences truncated to the token length: {self.truncated}")
        if self.bad:
            out.append(f"  skipped bad samples: {len(self.bad)}")
            out += [f"    sent_id {sid}: {why}" for sid, why in sorted(self.bad.items())[:20]]
        out.append(f"  time: {self.seconds:.1f} s")
        return out


# --------------------------------------------------------------------------------------------------
# Selection and settings


def select_samples(refer: ReferDataset, split: str, sentences: str, limit: int | None):
    """The samples of a split in cache order: sorted by (image_id, sent_id), optionally first-sentence/limited."""
    samples = refer.samples(split)
    if sentences == "first":
        seen, firsts = set(), []
        for s in samples:
            if s.ref_id not in seen:
                seen.add(s.ref_id)
                firsts.append(s)
        samples = firsts
    samples = sorted(samples, key=lambda s: (s.image_id, s.sent_id))
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DataError(f"split '{split}' of {refer.dataset} has no samples to extract")
    return samples


def build_tables(refer: ReferDataset, samples) -> tuple[SampleTable, ImageTable, list[str]]:
    """The cache's sample/image tables, plus each image row's file path."""
    orig_hw = {}
    for s in samples:
        if s.image_id not in orig_hw:
            info = refer.image(s.image_id)
            orig_hw[s.image_id] = (int(info["height"]), int(info["width"]))
    samples_table, images_table = layout.build_tables(samples, orig_hw)
    path_of = {s.image_id: str(s.image_path) for s in samples}
    return samples_table, images_table, [path_of[int(i)] for i in images_table.image_id]


def cache_settings(cfg: ExtractionConfig, backbone: Backbone) -> dict:
    """What the cache's fingerprint covers (noise levels excluded: they are groups inside one store)."""
    return {
        "backbone": dict(backbone.identity),
        "extraction": {
            "image_size": cfg.image_size,
            "token_length": cfg.token_length,
            "latent_scaling": cfg.latent_scaling,
            "noise_seed": cfg.noise_seed,
            "strides": sorted(cfg.strides),
            "attn_strides": sorted(cfg.attn_strides),
            "dtype": str(backbone.dtype).replace("torch.", ""),
            "text_field": cfg.text_field,
            "mask_rule": cfg.mask_rule,
        },
        "dataset": {
            "data_root": os.path.abspath(cfg.data_root),
            "dataset": cfg.dataset,
            "split_by": cfg.split_by,
            "split": cfg.split,
            "image_root": os.path.abspath(cfg.image_root) if cfg.image_root else None,
            "sentences": cfg.sentences,
            "limit": cfg.limit,
        },
    }


# --------------------------------------------------------------------------------------------------
# Stage 1a: images -> latents

WAIT_POLL_SECONDS = 1.0  # how often a process waiting for other processes' stage 1 looks again
# On CUDA, copy each batch's results to host memory on a side stream while the next batch computes
# (extract/host_copy.py); False = synchronous copies, for bench/extract.py to measure the difference.
OVERLAP_HOST_COPIES = True


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


def _loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=lambda items: list(zip(*items)), persistent_workers=False,
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


def _rows_of(shards: list[slice]) -> list[int]:
    return [r for s in shards for r in range(s.start, s.stop)]


class _StageWrites:
    """The shards of one stage this process claimed, and the thread writing them.

    On leaving (normally or by an error) every shard already handed over is written, then the
    claims are released: a claim is held until the shard is on disk or the process is gone.
    """

    def __init__(self, writer: CacheWriter, stage, shards: list[slice]):
        self.writer, self.stage = writer, stage
        self.mine, self.others = writer.claim_shards(stage, shards)
        self.io = BackgroundWriter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.io.close()  # raises the first write error, if any
        finally:
            self.writer.release_shards(self.stage, self.mine)
        return False


def _sent_ids_of_images(samples_table: SampleTable, image_rows) -> list[int]:
    return [int(s) for s in samples_table.sent_id[np.isin(samples_table.image_row, list(image_rows))]]


@torch.inference_mode()
def encode_latents(cfg, backbone, writer, image_paths, images_table, samples_table, report, bad_images,
                   shards: list[slice]) -> int:
    """VAE latents of the image shards in `shards` that no other process holds; returns how many it holds."""
    with _StageWrites(writer, "images", shards) as stage:
        rows = _rows_of(stage.mine)
        report.computed["vae (images)"] = report.computed.get("vae (images)", 0) + len(rows)
        if not rows:
            return len(stage.others)
        buffer = ShardBuffer(stage.mine, lambda s, a, skipped: stage.io.submit(writer.write_latents, s, a["latent"]))
        lat_shape = (backbone.vae.config.latent_channels, cfg.image_size // backbone.vae_scale_factor,
                     cfg.image_size // backbone.vae_scale_factor)
        scale = backbone.scaling_factor if cfg.latent_scaling == "sd" else 1.0
        bar = tqdm(total=len(rows), desc="VAE (images)", unit="img", disable=not cfg.progress)
        for batch_rows, xs, errors in _loader(_ImageRows(rows, image_paths, cfg.image_size), cfg.batch_size,
                                              cfg.workers):
            new_bad = {}
            for row, err in zip(batch_rows, errors):
                if err:
                    image_id = int(images_table.image_id[row])
                    if not cfg.skip_bad:
                        raise DataError(f"image_id {image_id} ({image_paths[row]}): {err} (use --skip-bad to skip it)")
                    new_bad[row] = err
            x = torch.stack(list(xs)).to(backbone.device, backbone.dtype)
            z0 = batch_invariant(backbone, lambda b: backbone.vae.encode(b).latent_dist.mode(), x) * scale
            z0 = z0.to(torch.float16).cpu().numpy()
            if not np.isfinite(z0).all():
                bad = [int(images_table.image_id[r]) for r, z in zip(batch_rows, z0) if not np.isfinite(z).all()]
                raise NonFiniteError(f"non-finite VAE latent for image_id {bad[0]}{_dtype_hint(backbone)}")
            for row, err in new_bad.items():
                # recorded before the shard is written: whoever sees it done also sees its bad samples
                writer.record_bad(_sent_ids_of_images(samples_table, [row]), err)
            bad_images.update(new_bad)
            for row, z in zip(batch_rows, z0):
                buffer.add(row, {"latent": z if row not in bad_images else np.zeros(lat_shape, np.float16)})
            bar.update(len(batch_rows))
        bar.close()
        return len(stage.others)


# --------------------------------------------------------------------------------------------------
# Stage 1b: sentences -> token ids, embeddings; GT masks


def count_truncated(tokenizer, texts: list[str], length: int) -> int:
    # verbose=False: these lengths are counted on purpose, no "longer than the maximum" warning
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    return sum(n > length for n in lengths)


@torch.inference_mode()
def encode_text(cfg, backbone, writer, refer, samples_table, report, bad_samples, shards: list[slice]) -> int:
    """Tokens, embeddings and masks of the sentence shards in `shards` that no other process holds;
    returns how many it holds."""
    with _StageWrites(writer, "text", shards) as stage:
        rows = _rows_of(stage.mine)
        key = "text encoder (sentences)"
        report.computed[key] = report.computed.get(key, 0) + len(rows)
        if not rows:
            return len(stage.others)
        buffer = ShardBuffer(stage.mine, lambda s, a, skipped: stage.io.submit(
            writer.write_text, s, a["input_ids"], a["attention_mask"], a["embedding"], a["gt"]))
        size, length = cfg.image_size, cfg.token_length
        masks: dict[int, np.ndarray] = {}  # ref_id -> mask at S×S; refs' sentences are adjacent-ish
        bar = tqdm(total=len(rows), desc="text + masks", unit="sent", disable=not cfg.progress)
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start:start + cfg.batch_size]
            new_bad: dict[int, str] = {}
            texts = []
            for row in batch:
                text = samples_table.text[row]
                if not text.strip():
                    sid = int(samples_table.sent_id[row])
                    if not cfg.skip_bad:
                        raise DataError(f"sent_id {sid} (ref {int(samples_table.ref_id[row])}) has an empty sentence "
                                        "(use --skip-bad to skip it)")
                    new_bad[row] = "empty sentence"
                texts.append(text)
            tok = backbone.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                     return_tensors="pt")
            ids = tok["input_ids"].to(backbone.device)
            emb = batch_invariant(backbone, lambda b: backbone.text_encoder(b)[0], ids)
            emb = emb.to(torch.float16).cpu().numpy()
            for row in batch:
                ref_id = int(samples_table.ref_id[row])
                if ref_id not in masks:
                    try:
                        masks[ref_id] = mask_to_size(refer.mask(ref_id, rule=cfg.mask_rule), size)
                    except DataError as exc:
                        if not cfg.skip_bad:
                            raise
                        new_bad.setdefault(row, str(exc))
                        masks[ref_id] = np.zeros((size, size), np.uint8)
            if new_bad:  # recorded before the shard is written (see encode_latents)
                rows_bad = sorted(new_bad)
                writer.record_bad([int(samples_table.sent_id[r]) for r in rows_bad], [new_bad[r] for r in rows_bad])
                bad_samples.update(new_bad)
            for j, row in enumerate(batch):
                buffer.add(row, {
                    "input_ids": tok["input_ids"][j].numpy().astype(np.int32),
                    "attention_mask": tok["attention_mask"][j].numpy().astype(np.uint8),
                    "embedding": emb[j],
                    "gt": masks[int(samples_table.ref_id[row])],
                })
            bar.update(len(batch))
        bar.close()
        return len(stage.others)


def finish_stage_one(cfg, backbone, writer, refer, image_paths, images_table, samples_table, report,
                     bad_images, bad_samples) -> None:
    """Return once every image and sentence of the store has its latent and embedding.

    The UNet stage of this process's samples reads latents and embeddings that other processes (the
    other --shard parts) may be writing. A shard that no process holds (its process died, or has not
    started yet) is computed here; shards that other processes hold are waited for, up to
    `cfg.wait_timeout` seconds. A remote store has no locks: there this only waits.
    """
    deadline = time.monotonic() + cfg.wait_timeout
    said = False
    while True:
        images, texts = writer.image_shards_todo(), writer.text_shards_todo()
        if not images and not texts:
            return
        if writer.has_locks:
            held = encode_latents(cfg, backbone, writer, image_paths, images_table, samples_table, report,
                                  bad_images, images)
            held += encode_text(cfg, backbone, writer, refer, samples_table, report, bad_samples, texts)
            if held < len(images) + len(texts):
                continue  # something was computed here: look again
        if time.monotonic() > deadline:
            missing_images = sum(s.stop - s.start for s in images)
            missing_texts = sum(s.stop - s.start for s in texts)
            raise CacheError(
                f"waited {cfg.wait_timeout:g} s for the other processes writing {cfg.out}: it still lacks the latents "
                f"of {missing_images}/{writer.n_images} images and the embeddings of {missing_texts}/"
                f"{writer.n_samples} sentences, which this process's UNet stage needs; check that the other "
                "--shard parts are running (or raise --wait-timeout); what is written is kept, rerun to resume")
        if not said and cfg.progress:
            tqdm.write(f"waiting for other processes to store {len(images)} image shards and {len(texts)} "
                       "sentence shards ...", file=sys.stderr)
            said = True
        time.sleep(WAIT_POLL_SECONDS)


# --------------------------------------------------------------------------------------------------
# Stage 2: UNet per (sentence, T)

FLOAT16_MAX = 65504.0  # the cache stores float16: anything larger becomes inf


def _dtype_hint(backbone: Backbone) -> str:
    if backbone.dtype == torch.float16:
        return " (float16 overflow in the backbone: rerun with --dtype bf16)"
    return ""


def feature_stats(captured: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Per sample and tensor `names[k]`, on the device (no sync): finite? and the largest magnitude.
    (B, len(names)) each, for `check_features`."""
    return {"finite": torch.stack([captured[n].flatten(1).isfinite().all(1) for n in names], 1),
            "peak": torch.stack([captured[n].flatten(1).abs().amax(1).float() for n in names], 1)}


def check_features(names: list[str], stats: dict[str, np.ndarray], rows, t: int, samples_table: SampleTable,
                   skip: set, backbone: Backbone) -> None:
    """Refuse (NonFiniteError naming the sample) features that are NaN/inf, or too large for float16.

    `stats` is `feature_stats` of the features in the compute dtype, taken before the float16
    conversion that would turn an overflow into inf, so the message can tell a backbone that
    overflows (fp16 compute) from values the cache cannot hold.
    """
    finite, peak = stats["finite"], stats["peak"]
    for j, row in enumerate(rows):
        row = int(row)
        if row in skip:
            continue
        sid = int(samples_table.sent_id[row])
        bad = [n for k, n in enumerate(names) if not finite[j, k]]
        if bad:
            raise NonFiniteError(f"non-finite features (NaN/inf) for sent_id {sid} at T={t} in {', '.join(bad)}; "
                                 f"nothing of its shard was stored{_dtype_hint(backbone)}")
        big = [(n, float(peak[j, k])) for k, n in enumerate(names) if peak[j, k] > FLOAT16_MAX]
        if big:
            name, value = max(big, key=lambda nv: nv[1])
            hint = _dtype_hint(backbone) or (" (the cache stores float16 whatever --dtype is: this backbone's "
                                             "activations do not fit; check the model weights)")
            raise NonFiniteError(f"features of sent_id {sid} at T={t} overflow float16, the cache's storage type "
                                 f"({name} reaches {value:.3g} > 65504); nothing of its shard was stored{hint}")


@torch.inference_mode()
def extract_noise_level(cfg, backbone, writer, spec, t, samples_table, report, bad_rows):
    timestep = cfg.timestep if cfg.timestep is not None else t
    writer.add_noise_level(t, timestep)
    with _StageWrites(writer, t, writer.feature_shards_todo(t, cfg.shard)) as stage:
        if stage.others:
            report.left_to_others[f"unet T={t}"] = len(stage.others)
        rows = _rows_of(stage.mine)
        report.computed[f"unet T={t}"] = len(rows)
        if not rows:
            return
        acp = alphas_cumprod(backbone.scheduler_config)
        zero = {ti.name: np.zeros(ti.shape, np.float16) for ti in spec.tensors}

        def flush(shard, arrays, skipped):
            stage.io.submit(writer.write_features, t, shard, arrays, skipped)

        buffer = ShardBuffer(stage.mine, flush)
        copies = HostCopies(backbone.device, overlap=OVERLAP_HOST_COPIES)
        names = [ti.name for ti in spec.tensors]
        bar = tqdm(total=len(rows), desc=f"UNet T={t}", unit="sample", disable=not cfg.progress)

        def store(batch, pending):  # the host side of a batch: checks, then rows into their shards
            host = copies.finish(pending)
            check_features(names, {k: host[k] for k in ("finite", "peak")}, batch, t, samples_table, bad_rows,
                           backbone)
            for j, row in enumerate(batch):
                row = int(row)
                if row in bad_rows:
                    buffer.add(row, zero, skipped=True)
                else:
                    buffer.add(row, {name: host[name][j] for name in names})
            bar.update(len(batch))

        # Software-pipelined: batch i+1 is queued on the device before batch i is stored on the host
        # (extract/host_copy.py); on the CPU this is the plain sequential loop.
        in_flight = None
        with UNetCapture(backbone.unet, spec) as capture:
            for start in range(0, len(rows), cfg.batch_size):
                batch = np.array(rows[start:start + cfg.batch_size])
                image_rows = samples_table.image_row[batch]
                z0 = torch.from_numpy(writer.read_latents(image_rows)).float()
                eps = torch.stack([make_noise(tuple(z0.shape[1:]), cfg.noise_seed, int(samples_table.image_id[r]), t)
                                   for r in batch])
                zt = copies.to_device(add_noise(z0, t, eps, acp), backbone.dtype)
                emb = copies.to_device(torch.from_numpy(writer.read_embeddings(batch)), backbone.dtype)
                steps = torch.full((len(batch),), timestep, dtype=torch.long, device=backbone.device)
                captured = batch_invariant(backbone, capture.run, zt, steps, emb)
                results = {name: captured[name].to(torch.float16) for name in names}
                pending = copies.start({**results, **feature_stats(captured, names)})
                del captured, results
                if in_flight is not None:
                    store(*in_flight)
                in_flight = (batch, pending)
            if in_flight is not None:
                store(*in_flight)
        bar.close()


# --------------------------------------------------------------------------------------------------


def run_extraction(cfg: ExtractionConfig, backbone: Backbone | None = None) -> ExtractionReport:
    """Extract features for every noise level in `cfg.noise_ts` into `cfg.out` (resumable).

    Several processes may run this on one store at once, each with its own `cfg.shard` part (or the
    same part: then they share its shards). Stage 1 (latents, embeddings) is finished by all of them
    together before any runs its UNet stage (`finish_stage_one`).
    """
    t_start = time.perf_counter()
    if cfg.batch_size < 1:
        raise RefsegError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if any(t < 0 or t > 999 for t in cfg.noise_ts):
        raise RefsegError(f"--noise-t must be in 0..999 (got {list(cfg.noise_ts)})")
    refer = ReferDataset(cfg.data_root, cfg.dataset, split_by=cfg.split_by, image_root=cfg.image_root,
                         text_field=cfg.text_field)
    samples = select_samples(refer, cfg.split, cfg.sentences, cfg.limit)
    samples_table, images_table, image_paths = build_tables(refer, samples)
    if backbone is None:
        backbone = load_backbone(cfg.model, model_config=cfg.model_config, device=cfg.device, dtype=cfg.dtype)
    spec = backbone.spec(cfg.image_size, cfg.token_length, cfg.strides, cfg.attn_strides)
    writer_kwargs = {"shard_size": cfg.shard_size} if cfg.shard_size else {}
    report = ExtractionReport(len(samples), len(image_paths), tuple(cfg.noise_ts))
    report.truncated = count_truncated(backbone.tokenizer, samples_table.text, cfg.token_length)
    bad_images: dict[int, str] = {}  # image row -> reason
    bad_samples: dict[int, str] = {}  # sample row -> reason
    try:
        writer = CacheWriter.open(cfg.out, spec=spec, settings=cache_settings(cfg, backbone), samples=samples_table,
                                  images=images_table, codec=cfg.codec, overwrite=cfg.overwrite, **writer_kwargs)
        with writer:
            encode_latents(cfg, backbone, writer, image_paths, images_table, samples_table, report, bad_images,
                           writer.image_shards_todo(cfg.shard))
            encode_text(cfg, backbone, writer, refer, samples_table, report, bad_samples,
                        writer.text_shards_todo(cfg.shard))
            finish_stage_one(cfg, backbone, writer, refer, image_paths, images_table, samples_table, report,
                             bad_images, bad_samples)
            bad_rows = set(int(r) for r in writer.bad_rows())  # found by this process or another
            for t in cfg.noise_ts:
                extract_noise_level(cfg, backbone, writer, spec, t, samples_table, report, bad_rows)
            for t in cfg.noise_ts:  # other parts may still be running, or still to be started
                todo = len(writer.feature_shards_todo(t))
                if todo:
                    report.incomplete[t] = todo
    except NonFiniteError as exc:
        hint = _dtype_hint(backbone)
        raise NonFiniteError(str(exc) if hint in str(exc) else f"{exc}{hint}") from None
    except PermissionError:
        raise  # a path the user cannot write: the CLI names it, there is nothing to resume
    except OSError as exc:
        raise CacheWriteError.from_os_error(cfg.out, exc) from exc
    for row in np.flatnonzero(np.isin(samples_table.image_row, list(bad_images))):
        bad_samples.setdefault(int(row), bad_images[int(samples_table.image_row[row])])
    report.bad = {int(samples_table.sent_id[r]): why for r, why in bad_samples.items()}
    report.seconds = time.perf_counter() - t_start
    return report


def with_preset(cfg: ExtractionConfig, preset: str | None, explicit: set[str]) -> ExtractionConfig:
    """Apply a named preset to the settings the user did not set explicitly."""
    if preset is None:
        return cfg
    if preset != "vpd":
        raise RefsegError(f"unknown preset '{preset}' (known: vpd)")
    # VPD (Zhao et al. 2023): no noise, UNet timestep 1, unscaled latents, 40 tokens, A32 attention.
    values = {"noise_ts": (0,), "timestep": 1, "latent_scaling": "none", "token_length": 40, "attn_strides": (16, 32)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k not in explicit})
