"""Train a head on one noise level of a cache, nanoGPT style: one loop, read top to bottom.

Only samples flagged done at that noise level are used. Loss: cross-entropy on logits upsampled
(bilinear, align_corners=True) to S x S with class weights [0.9, 1.1] (VPD/LAVT); `ce+dice` adds a
soft Dice term. Optimizers:
  - `adamw` (default, VPD/LAVT): lr 5e-5, weight decay 1e-2, poly decay of the lr per iteration,
    lr * (1 - it / total_iterations) ** 0.9.
  - `adam`: lr 1e-4, no weight decay, constant lr (the seed report's plain setting).
bf16 autocast on CUDA, fp32 on CPU. The same seeds give the same weights: init under
`torch.manual_seed(seed)`, and each epoch's shuffle is a permutation drawn from a generator seeded by
(data_seed, epoch), so an interrupted run resumed from its last completed epoch ends with exactly the
weights of an uninterrupted one. `best.safetensors` is selected on the *val* cache's oIoU, as
VPD/LAVT report their best epoch on val; report test numbers from a split never used to select.
Under `torchrun` it trains with DDP, `batch_size` being the global batch (heads/distributed.py).

The set-up (checks, data, head, run directory, resume) is heads/train_setup.py; here is the loop
over the state it returns, the per-batch step of one head, and the end of an epoch. The loop feeds
each batch to every head of the state: one head for `refseg-train-head`, K for a sweep
(heads/sweep.py), whose heads then see exactly what K solo runs would, step for step.
"""

from __future__ import annotations

import math
import time

import torch

from refseg.core.cli import warn
from refseg.core.errors import RunError, RunWriteError
from refseg.heads import run_dir
from refseg.heads.batches import autocast, batch_to_device
from refseg.heads.losses import class_weight_total, segmentation_loss
from refseg.heads.scoring import score
from refseg.heads.settings import EVAL_BATCH_SIZE, TrainSettings
from refseg.heads.train_setup import HeadState, TrainState, abandon_untrained, set_up


def train(cache, noise_t, head, out, *, progress=True, **options) -> dict:
    """Train head `head` on `cache` at noise level `noise_t` into run directory `out`; -> final summary.

    `options`: the fields of TrainSettings (val_cache=None, epochs=10, batch_size=8, lr=None,
    optimizer="adamw", ...); any other keyword is the head's own (tensors=..., text_hidden=...).
    """
    settings, head_args = TrainSettings.from_keywords(cache=cache, noise_t=noise_t, head=head, out=out, **options)
    return run_training(settings, head_args, progress=progress)


def run_training(settings: TrainSettings, head_args: dict | None = None, *, progress: bool = True) -> dict:
    """`train` from its settings (what `refseg-train-head` runs)."""
    state = set_up(settings, head_args or {}, progress)
    try:
        run_epochs(state)
    except Exception:  # (not Ctrl-C: its line says what was kept and how to resume)
        abandon_untrained(state)  # a run that never completed an epoch leaves no folder behind
        raise
    finally:  # however training ends, the run directory is free for the next trainer (or --resume)
        state.release()
    state.ranks.stop()
    return summary(state, state.head)


def run_epochs(state: TrainState, keep_going: bool = False) -> None:
    """The loop: each epoch one pass over the shuffled batches for every head still training it, then
    validation and the run's files. Heads may stand at different epochs (a sweep resumed after a kill)
    or stop at different ones. `keep_going`: a head that diverges stops alone (a sweep), instead of
    ending training with its error; a write that fails (a full disk) ends it for all."""
    last = max(head.settings.epochs for head in state.heads)
    for epoch in range(min(head.epoch for head in state.heads) + 1, last + 1):
        active = [h for h in state.heads if h.failed is None and h.epoch < epoch <= h.settings.epochs]
        if not active:
            continue
        records = train_epoch(state, active, epoch)
        due = [h for h, r in zip(active, records) if validation_due(state, h, epoch) and math.isfinite(r["loss"])]
        scores = dict(zip(map(id, due), validate(state, due)))
        for head, record in zip(active, records):
            head.epoch = epoch
            try:
                end_epoch(state, head, record, scores.get(id(head)))
            except RunError as exc:
                if not keep_going or isinstance(exc, RunWriteError):  # a full disk stops every head, not one
                    raise
                head.failed = str(exc)
                head.release()
                warn(head.failed)


def train_epoch(state: TrainState, heads: list[HeadState], epoch: int) -> list[dict]:
    """One pass over the epoch's batches, each read and moved to the device once and fed to every
    head in turn; -> each head's record of the epoch (loss, lr, speed)."""
    s = state.settings
    for head in heads:
        head.model.train()
    state.batches.set_epoch(epoch)
    bar = _bar(state.progress, state.n_samples, f"epoch {epoch}/{max(h.settings.epochs for h in heads)}")
    loss_sums = [torch.zeros((), device=state.device) for _ in heads]
    seen, t0 = 0, time.perf_counter()
    for k, batch in enumerate(state.loader):
        features, text, text_mask = batch_to_device(batch, state.device, non_blocking=True)
        gt = batch["gt"].to(state.device, non_blocking=True)
        global_b = min(s.batch_size, state.n_samples - k * s.batch_size)  # this step's samples, all ranks
        for head, loss_sum in zip(heads, loss_sums):
            batch_loss = train_step(state, head, (features, text, text_mask), gt, global_b)
            head.iteration += 1
            loss_sum += batch_loss * global_b  # summed on the device (in place): no GPU sync per iteration
        seen += global_b
        if bar is not None:
            bar.update(global_b)
            if (heads[0].iteration % 10 == 0 or seen == state.n_samples) and not state.ranks.active:
                bar.set_postfix(loss=f"{loss_sums[0].item() / seen:.4f}",
                                lr=f"{heads[0].lr_at(heads[0].iteration - 1):.2e}")
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    records = []
    for head, loss_sum in zip(heads, loss_sums):
        state.ranks.sum(loss_sum)  # under DDP each rank holds its part of every batch's loss
        records.append({"epoch": epoch, "iteration": head.iteration, "loss": loss_sum.item() / seen,
                        "samples_per_s": seen / elapsed if elapsed > 0 else None,
                        "lr": head.lr_at(head.iteration - 1)})
    return records


def train_step(state: TrainState, head: HeadState, inputs: tuple, gt: torch.Tensor, global_b: int) -> torch.Tensor:
    """One optimizer step of one head on this rank's share of a global batch of `global_b` samples;
    -> that share's part of the batch's loss (detached)."""
    for group in head.optimizer.param_groups:
        group["lr"] = head.lr_at(head.iteration)
    with autocast(state.device):
        logits = head.trained(*inputs)
    ranks = state.ranks
    if ranks.active:
        # this rank's part of the global batch's loss (normalised by the whole batch's totals; a
        # placeholder's part is 0); DDP averages gradients over ranks, hence the * world
        mine = float(ranks.share(global_b) > 0)
        totals = ranks.sum(torch.stack([class_weight_total(gt), torch.tensor(float(len(gt)), device=state.device)])
                           * mine)
        batch_loss = segmentation_loss(logits, gt, head.settings.loss, totals=totals) * mine
        step_loss = batch_loss * ranks.world
    else:
        batch_loss = step_loss = segmentation_loss(logits, gt, head.settings.loss)
    head.optimizer.zero_grad(set_to_none=True)
    step_loss.backward()
    head.optimizer.step()
    return batch_loss.detach()


def validation_due(state: TrainState, head: HeadState, epoch: int) -> bool:
    s = head.settings
    return state.val_set is not None and (epoch % s.eval_every == 0 or epoch == s.epochs)


def validate(state: TrainState, heads: list[HeadState]) -> list[dict]:
    """Protocol `vpd` on the val set for every head, each val batch read once -> one summary per head.

    The scoring is refseg-eval's (heads/scoring.py, in refseg-eval's batches, EVAL_BATCH_SIZE), so a
    head's logged numbers are the ones `refseg-eval` gives this epoch's weights on the val cache.
    """
    if not heads:
        return []
    metrics = score([head.model for head in heads], state.val_set, device=state.device, batch_size=EVAL_BATCH_SIZE)
    return [scores.summary() for scores in metrics]


def end_epoch(state: TrainState, head: HeadState, record: dict, val: dict | None = None) -> None:
    """Keep the best weights (by `val`, this epoch's val summary when validated), then write the epoch's files."""
    s, epoch = head.settings, record["epoch"]
    if not math.isfinite(record["loss"]):  # nothing of this epoch is saved: the run keeps the last good one
        raise diverged(state, head, record)
    where = f"{head.out.name}: " if state.labelled else ""
    if val is not None:
        record["val"] = val
        if head.best_oiou is None or val["oIoU"] > head.best_oiou:
            head.best_oiou = val["oIoU"]
            run_dir.save_weights(head.out / run_dir.BEST, head.model.state_dict(), {"epoch": str(epoch)})
            record["best"] = True
        state.say(f"{where}epoch {epoch}: loss {record['loss']:.4f}, val oIoU {val['oIoU']:.2f} mIoU {val['mIoU']:.2f}")
    else:
        state.say(f"{where}epoch {epoch}: loss {record['loss']:.4f}")

    # Order matters for an interruption: weights and the log line first, the state (what resume
    # trusts) last; resume drops log lines past the state's epoch.
    if state.ranks.main:
        run_dir.save_weights(head.out / run_dir.HEAD, head.model.state_dict(), {"epoch": str(epoch)})
        run_dir.append_metrics(head.out, record)
        if s.tensorboard:
            _log_tensorboard(head, record)
        run_dir.save_state(head.out, head.model, head.optimizer, {
            "epoch": epoch, "iteration": head.iteration, "best_val_oIoU": head.best_oiou, "seed": s.seed,
            "epochs": s.epochs})
    state.ranks.barrier()


def diverged(state: TrainState, head: HeadState, record: dict) -> RunError:
    """Why the loss of this epoch is not finite, in one line: a sample of the cache whose inputs to the head
    are not finite (a damaged cache: --lr is not the cause), or else the optimization (try a lower --lr)."""
    s, epoch = head.settings, record["epoch"]
    kept = f"{s.out} keeps what the epochs before it saved" if epoch > 1 else "no epoch was saved"
    found = state.non_finite_input(head)
    if found is not None:
        sent_id, name = found
        return RunError(f"training diverged in epoch {epoch}: the loss is {record['loss']} because cache {s.cache} "
                        f"holds non-finite values in sample sent_id {sent_id} (tensor {name} at T={s.noise_t}): run "
                        f"`refseg-cache verify {s.cache}`; {kept}")
    return RunError(f"training diverged in epoch {epoch}: the loss is {record['loss']} (the cache's inputs to the "
                    f"head are finite); {kept}; try a lower --lr")


def _log_tensorboard(head: HeadState, record: dict) -> None:
    """RUN/tb/: train loss and lr per epoch, and the val metrics when validated (--tensorboard)."""
    if head.tensorboard is None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: TensorBoard is optional (checked at set-up)

        head.tensorboard = SummaryWriter(log_dir=str(head.out / run_dir.TENSORBOARD))
    epoch, writer = record["epoch"], head.tensorboard
    writer.add_scalar("train/loss", record["loss"], epoch)
    writer.add_scalar("train/lr", record["lr"], epoch)
    for name, value in (record.get("val") or {}).items():
        if name != "n":
            writer.add_scalar(f"val/{name}", value, epoch)
    writer.flush()


def summary(state: TrainState, head: HeadState) -> dict:
    """What training reports of one head when it ends (`train`'s return value)."""
    s = head.settings
    history = run_dir.read_metrics(head.out)
    last = history[-1] if history else {}
    return {"run": str(head.out), "head": s.head, "noise_t": s.noise_t, "epochs": last.get("epoch", head.epoch),
            "loss": last.get("loss"), "val": last.get("val"), "best_val_oIoU": head.best_oiou,
            "best_epoch": max((r["epoch"] for r in history if r.get("best")), default=None),
            "samples": int(state.n_samples), "parameters": head.parameters, "coverage": state.coverage}


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm  # deferred: only a run that shows progress needs tqdm

    return tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, leave=False)
