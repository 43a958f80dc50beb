"""Train a head on one noise level of a cache, nanoGPT style: one loop, read top to bottom.

Only samples flagged done at that noise level are used. Loss: cross-entropy on logits upsampled
(bilinear, align_corners=True) to S x S with class weights [0.9, 1.1] (VPD/LAVT); `ce+dice` adds a
soft Dice term. Optimizers:
  - `adamw` (default, VPD/LAVT): lr 5e-5, weight decay 1e-2, poly decay of the lr per iteration,
    lr * (1 - it / total_iterations) ** 0.9.
  - `adam`: lr 1e-4, no weight decay, constant lr (the seed report's plain setting).
bf16 autocast on CUDA, fp32 on CPU. The same seed gives the same weights: init under
`torch.manual_seed(seed)`, and each epoch's shuffle is a permutation drawn from a generator seeded by
(seed, epoch), so an interrupted run resumed from its last completed epoch ends with exactly the
weights of an uninterrupted one. `best.safetensors` is selected on the *val* cache's oIoU, as
VPD/LAVT report their best epoch on val; report test numbers from a split never used to select.
Under `torchrun` it trains with DDP, `batch_size` being the global batch (heads/distributed.py).
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path

import numpy as np
import torch

from refseg.cache import FeatureDataset
from refseg.heads import run_dir
from refseg.heads.distributed import RankBatches, Ranks
from refseg.heads.evaluate import (as_cache, autocast, batch_to_device, check_compatible, evaluate_model,
                            make_loader, resolve_device)
from refseg.heads.losses import LOSSES, class_weight_total, segmentation_loss
from refseg.heads.registry import HEADS, build_head, _load_builtin_heads
from refseg.core.errors import CacheError, RefsegError, RunError
from refseg.core.memory import available_memory

OPTIMIZERS = {  # name: (default lr, weight decay, poly decay)
    "adamw": (5e-5, 1e-2, True),
    "adam": (1e-4, 0.0, False),
}
POLY_POWER = 0.9


class EpochShuffle(torch.utils.data.Sampler):
    """A fresh permutation per epoch, drawn from a generator seeded by (seed, epoch): reproducible
    and independent of how many epochs ran before in this process (so resuming changes nothing)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def train(cache, noise_t, head, out, *, val_cache=None, epochs=10, batch_size=8, lr=None, optimizer="adamw",
          loss="ce", seed=0, device="auto", workers=0, preload="auto", resume=False, hidden=640, eval_every=1,
          max_samples=None, progress=True, **head_kwargs) -> dict:
    """Train head `head` on `cache` at noise level `noise_t` into run directory `out`; -> final summary."""
    _load_builtin_heads()
    if head not in HEADS:
        raise RefsegError(f"unknown head {head!r} (available: {', '.join(sorted(HEADS))})")
    if optimizer not in OPTIMIZERS:
        raise RefsegError(f"unknown optimizer {optimizer!r} (choose {' or '.join(OPTIMIZERS)})")
    if loss not in LOSSES:
        raise RefsegError(f"unknown loss {loss!r} (choose {' or '.join(LOSSES)})")
    if epochs < 1 or batch_size < 1:
        raise RefsegError("--epochs and --batch-size must be at least 1")
    out, noise_t, device = Path(out), int(noise_t), resolve_device(device)
    ranks = Ranks.from_env()  # one process unless launched by torchrun
    device = ranks.start(device)
    progress = progress and ranks.main
    default_lr, weight_decay, poly = OPTIMIZERS[optimizer]
    lr = float(lr) if lr is not None else default_lr

    # ---- data -------------------------------------------------------------------------------
    train_cache, train_path = as_cache(cache)
    done = np.asarray(train_cache.done(noise_t))  # a missing noise level: the cache's CacheError
    rows = np.flatnonzero(done)
    if max_samples is not None:
        rows = rows[: int(max_samples)]
    if len(rows) == 0:
        raise CacheError(f"cache {train_path} has no finished samples at noise T={noise_t}")
    spec = train_cache.spec

    val_ds = None
    if val_cache is not None:
        val_cache, val_path = as_cache(val_cache)
        check_compatible(train_cache.settings, val_cache.settings, f"training cache {train_path}", str(val_path),
                         reference="the training cache")
        val_rows = np.flatnonzero(np.asarray(val_cache.done(noise_t)))
        if len(val_rows) == 0:
            raise CacheError(f"val cache {val_path} has no finished samples at noise T={noise_t}")

    # ---- model (init under the seed, before anything else draws random numbers) ---------------
    head_args = dict(head_kwargs)
    if "hidden" in inspect.signature(HEADS[head]).parameters:
        head_args["hidden"] = hidden
    torch.manual_seed(seed)
    model = build_head(head, spec, **head_args)
    n_params = sum(p.numel() for p in model.parameters())

    config = {
        "head": head, "head_args": model.head_args, "spec": spec.select(model.tensor_names).to_dict(),
        "noise_t": noise_t, "timestep": _timestep(train_cache, noise_t),
        "cache": {"path": str(train_path), "fingerprint": train_cache.fingerprint, "settings": train_cache.settings,
                  "samples": int(len(rows))},
        "val_cache": str(val_path) if val_cache is not None else None,
        "seed": seed, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
        "lr_schedule": f"poly {POLY_POWER} per iteration" if poly else "constant",
        "loss": loss, "class_weights": [0.9, 1.1], "epochs": epochs, "batch_size": batch_size,
        "max_samples": max_samples, "parameters": n_params, "versions": _versions(), "world_size": ranks.world,
    }
    if resume and (out / run_dir.CONFIG).exists():
        _check_resumable(out, config)
    elif resume and out.is_dir() and any(out.iterdir()):
        raise RunError(f"{out} is not empty and is not a head run directory (no {run_dir.CONFIG}): nothing to resume")
    elif not resume and ranks.main:
        run_dir.prepare_new(out)
    ranks.barrier()  # the other ranks look at `out` only once rank 0 has made it
    out.mkdir(parents=True, exist_ok=True)

    dataset = FeatureDataset(train_path, noise_t, names=model.tensor_names, rows=rows, text=model.uses_text,
                             preload=_preload_ok(preload, spec, model, len(rows), train_path, progress,
                                                 ranks.local_world))
    if val_cache is not None and ranks.main:
        val_ds = FeatureDataset(val_path, noise_t, names=model.tensor_names, rows=val_rows, text=model.uses_text,
                                preload=_preload_ok(preload, spec, model, len(val_rows), val_path, progress))

    batches = RankBatches(EpochShuffle(len(dataset), seed), batch_size, ranks)
    loader = make_loader(dataset, None, device, batch_sampler=batches, workers=workers)
    iters_per_epoch = math.ceil(len(dataset) / batch_size)
    total_iters = epochs * iters_per_epoch

    model.to(device)
    trained = ranks.wrap(model, device)  # DDP under torchrun: its forward/backward all-reduce the gradients
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(it: int) -> float:
        return lr * (1 - it / total_iters) ** POLY_POWER if poly else lr

    # ---- resume from the last completed epoch ------------------------------------------------
    start_epoch, iteration, best_oiou = 0, 0, None
    if resume and (out / run_dir.STATE).exists():
        info, model_sd, opt_sd, rng = run_dir.load_state(out)
        try:
            model.load_state_dict(model_sd)
            opt.load_state_dict(opt_sd)
        except (RuntimeError, ValueError, KeyError) as exc:  # a state file of another head or other settings
            raise RunError(f"{out / run_dir.STATE} does not fit head {head!r} {model.head_args}: "
                           f"{run_dir.first_mismatch(exc)}") from None
        torch.set_rng_state(rng["rng.torch"])
        if device.type == "cuda" and "rng.cuda.0" in rng:
            torch.cuda.set_rng_state_all([rng[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                          if f"rng.cuda.{i}" in rng])
        start_epoch, iteration, best_oiou = info["epoch"], info["iteration"], info["best_val_oIoU"]
        if ranks.main:
            run_dir.truncate_metrics(out, start_epoch)
        if poly and info.get("epochs") != epochs:
            _say(progress, f"note: the poly lr schedule was planned for {info.get('epochs')} epochs and now spans "
                           f"{epochs}: the result differs from a run trained for {epochs} epochs from the start")
        _say(progress, f"resuming {out} after epoch {start_epoch}/{epochs}")
    elif resume and ranks.main:
        run_dir.truncate_metrics(out, 0)  # a first epoch that never finished may have logged a line
        _say(progress, f"nothing to resume in {out}: starting from epoch 1")
    if ranks.main:
        run_dir.write_json(out / run_dir.CONFIG, config)
    _say(progress, f"training {head} ({n_params / 1e6:.2f}M parameters) on {len(dataset)} samples at T={noise_t}, "
                   f"{device}, {epochs} epochs x {iters_per_epoch} iterations"
                   + (f", {ranks.world} ranks" if ranks.active else ""))

    # ---- the loop ------------------------------------------------------------------------------
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        batches.set_epoch(epoch)
        bar = _bar(progress, len(dataset), f"epoch {epoch}/{epochs}")
        loss_sum, seen, t0 = torch.zeros((), device=device), 0, time.perf_counter()
        for k, batch in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = lr_at(iteration)
            features, text, text_mask = batch_to_device(batch, device, non_blocking=True)
            gt = batch["gt"].to(device, non_blocking=True)
            with autocast(device):
                logits = trained(features, text, text_mask)
            global_b = min(batch_size, len(dataset) - k * batch_size)
            if ranks.active:
                # this rank's part of the global batch's loss (normalised by the whole batch's totals;
                # a placeholder's part is 0); DDP averages gradients over ranks, hence the * world
                mine = float(ranks.share(global_b) > 0)
                totals = ranks.sum(torch.stack([class_weight_total(gt), torch.tensor(float(len(gt)), device=device)])
                                   * mine)
                batch_loss = segmentation_loss(logits, gt, loss, totals=totals) * mine
                step_loss = batch_loss * ranks.world
            else:
                batch_loss = step_loss = segmentation_loss(logits, gt, loss)
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            opt.step()
            iteration += 1

            loss_sum += batch_loss.detach() * global_b  # summed on the device: no GPU sync per iteration
            seen += global_b
            if bar is not None:
                bar.update(global_b)
                if (iteration % 10 == 0 or seen == len(dataset)) and not ranks.active:  # DDP: rank parts only
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr_at(iteration - 1):.2e}")
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        ranks.sum(loss_sum)  # under DDP each rank holds its part of every batch's loss

        record = {"epoch": epoch, "iteration": iteration, "loss": loss_sum.item() / seen,
                  "samples_per_s": seen / elapsed if elapsed > 0 else None, "lr": lr_at(iteration - 1)}
        if val_ds is not None and (epoch % eval_every == 0 or epoch == epochs):
            summary, _ = evaluate_model(model, val_ds, device=device, batch_size=max(batch_size, 16))
            record["val"] = summary
            if best_oiou is None or summary["oIoU"] > best_oiou:
                best_oiou = summary["oIoU"]
                run_dir.save_weights(out / run_dir.BEST, model.state_dict(), {"epoch": str(epoch)})
                record["best"] = True
            _say(progress, f"epoch {epoch}: loss {record['loss']:.4f}, val oIoU {summary['oIoU']:.2f} "
                           f"mIoU {summary['mIoU']:.2f}")
        elif progress:
            _say(progress, f"epoch {epoch}: loss {record['loss']:.4f}")

        # Order matters for an interruption: weights and the log line first, the state (what resume
        # trusts) last; resume drops log lines past the state's epoch.
        if ranks.main:
            run_dir.save_weights(out / run_dir.HEAD, model.state_dict(), {"epoch": str(epoch)})
            run_dir.append_metrics(out, record)
            run_dir.save_state(out, model, opt, {"epoch": epoch, "iteration": iteration, "best_val_oIoU": best_oiou,
                                                 "seed": seed, "epochs": epochs})
        ranks.barrier()

    ranks.stop()
    history = run_dir.read_metrics(out)
    last = history[-1] if history else {}
    return {"run": str(out), "head": head, "noise_t": noise_t, "epochs": last.get("epoch", start_epoch),
            "loss": last.get("loss"), "val": last.get("val"), "best_val_oIoU": best_oiou,
            "samples": int(len(dataset)), "parameters": n_params}


# ---- helpers ------------------------------------------------------------------------------------
RESUME_KEYS = ("head", "head_args", "noise_t", "seed", "optimizer", "lr", "loss", "batch_size", "max_samples")


def _check_resumable(out: Path, config: dict) -> None:
    """A resumed run must be the same experiment; only the number of epochs may grow."""
    old = run_dir.read_config(out)
    if old["head"] != config["head"]:
        raise RunError(f"run {out} trains head {old['head']!r}, not {config['head']!r}: choose another --out")
    if old["cache"]["fingerprint"] != config["cache"]["fingerprint"]:
        raise RunError(f"run {out} was trained on a different cache (fingerprint {old['cache']['fingerprint']}, "
                       f"this one {config['cache']['fingerprint']})")
    for key in RESUME_KEYS:
        if old.get(key) != config.get(key):
            raise RunError(f"run {out} was trained with {key}={old.get(key)!r}, not {config.get(key)!r}: resume with "
                           "the same settings, or choose another --out")


def _timestep(cache, noise_t: int):
    try:
        return int(cache.timestep(noise_t))
    except Exception:  # older caches may not record it separately; the noise T is what matters
        return None


def _versions() -> dict:
    import refseg.core

    return {"torch": torch.__version__, "refseg": refseg.core.__version__}


def _preload_ok(preload, spec, model, n: int, path, progress: bool, copies: int = 1) -> bool:
    """Whether to load the samples into RAM first; says how much it needs.

    preload=True: always (FeatureDataset refuses, with one line, what does not fit). preload="auto"
    (the default): when it needs less than half the available memory, counting `copies` (the ranks
    on this machine each load their own). Reading from RAM is as fast as
    direct shard reads of a local uncompressed cache and 4x faster than zarr's API (BENCHMARKS.md),
    spares the disk, and gives the same bytes.
    """
    if not preload:
        return False
    per_sample = sum(spec[name].nbytes(2) for name in model.tensor_names) + spec.image_size ** 2
    if model.uses_text:
        per_sample += spec.token_length * (spec.text_dim * 2 + 1)
    need = per_sample * n
    avail = available_memory()
    if preload == "auto" and (avail is None or need * copies > avail / 2):
        return False
    _say(progress, f"preload: {need / 1e9:.2f} GB for {n} samples of {path}"
          + (f" ({avail / 1e9:.1f} GB available)" if avail else ""))
    return True


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, leave=False)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)
