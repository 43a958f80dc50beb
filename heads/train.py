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

The set-up (checks, data, head, run directory, resume) is heads/train_setup.py; here is the loop
over the state it returns, the per-batch step of one head, and the end of an epoch.
"""

from __future__ import annotations

import math
import time

import torch

from refseg.core.errors import RunError
from refseg.heads import run_dir
from refseg.heads.batches import autocast, batch_to_device
from refseg.heads.evaluate import evaluate_model
from refseg.heads.losses import class_weight_total, segmentation_loss
from refseg.heads.settings import TrainSettings
from refseg.heads.train_setup import HeadState, TrainState, set_up


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
    finally:  # however training ends, the run directory is free for the next trainer (or --resume)
        if state.run_lock is not None:
            state.run_lock.release()
    state.ranks.stop()
    return _summary(state)


def run_epochs(state: TrainState) -> None:
    """The loop: each epoch one pass over the shuffled batches, then validation and the run's files."""
    s, head = state.settings, state.head
    for epoch in range(state.epoch + 1, s.epochs + 1):
        head.model.train()
        state.batches.set_epoch(epoch)
        bar = _bar(state.progress, state.n_samples, f"epoch {epoch}/{s.epochs}")
        loss_sum, seen, t0 = torch.zeros((), device=state.device), 0, time.perf_counter()
        for k, batch in enumerate(state.loader):
            features, text, text_mask = batch_to_device(batch, state.device, non_blocking=True)
            gt = batch["gt"].to(state.device, non_blocking=True)
            global_b = min(s.batch_size, state.n_samples - k * s.batch_size)  # this step's samples, all ranks
            batch_loss = train_step(state, head, (features, text, text_mask), gt, global_b)
            state.iteration += 1
            loss_sum += batch_loss * global_b  # summed on the device: no GPU sync per iteration
            seen += global_b
            if bar is not None:
                bar.update(global_b)
                if (state.iteration % 10 == 0 or seen == state.n_samples) and not state.ranks.active:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{head.lr_at(state.iteration - 1):.2e}")
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        state.ranks.sum(loss_sum)  # under DDP each rank holds its part of every batch's loss
        state.epoch = epoch
        end_epoch(state, head, {"epoch": epoch, "iteration": state.iteration, "loss": loss_sum.item() / seen,
                                "samples_per_s": seen / elapsed if elapsed > 0 else None,
                                "lr": head.lr_at(state.iteration - 1)})


def train_step(state: TrainState, head: HeadState, inputs: tuple, gt: torch.Tensor, global_b: int) -> torch.Tensor:
    """One optimizer step of one head on this rank's share of a global batch of `global_b` samples;
    -> that share's part of the batch's loss (detached)."""
    for group in head.optimizer.param_groups:
        group["lr"] = head.lr_at(state.iteration)
    with autocast(state.device):
        logits = head.trained(*inputs)
    ranks = state.ranks
    if ranks.active:
        # this rank's part of the global batch's loss (normalised by the whole batch's totals; a
        # placeholder's part is 0); DDP averages gradients over ranks, hence the * world
        mine = float(ranks.share(global_b) > 0)
        totals = ranks.sum(torch.stack([class_weight_total(gt), torch.tensor(float(len(gt)), device=state.device)])
                           * mine)
        batch_loss = segmentation_loss(logits, gt, state.settings.loss, totals=totals) * mine
        step_loss = batch_loss * ranks.world
    else:
        batch_loss = step_loss = segmentation_loss(logits, gt, state.settings.loss)
    head.optimizer.zero_grad(set_to_none=True)
    step_loss.backward()
    head.optimizer.step()
    return batch_loss.detach()


def end_epoch(state: TrainState, head: HeadState, record: dict) -> None:
    """Validate (rank 0, when due) and keep the best weights, then write the epoch's files."""
    s, epoch = state.settings, record["epoch"]
    if not math.isfinite(record["loss"]):  # nothing of this epoch is saved: the run keeps the last good one
        raise RunError(f"training diverged in epoch {epoch}: the loss is {record['loss']}; {s.out} keeps what the "
                       "epochs before it saved; try a lower --lr")
    if state.val_set is not None and (epoch % s.eval_every == 0 or epoch == s.epochs):
        summary, _ = evaluate_model(head.model, state.val_set, device=state.device, batch_size=max(s.batch_size, 16))
        record["val"] = summary
        if head.best_oiou is None or summary["oIoU"] > head.best_oiou:
            head.best_oiou = summary["oIoU"]
            run_dir.save_weights(head.out / run_dir.BEST, head.model.state_dict(), {"epoch": str(epoch)})
            record["best"] = True
        state.say(f"epoch {epoch}: loss {record['loss']:.4f}, val oIoU {summary['oIoU']:.2f} "
                  f"mIoU {summary['mIoU']:.2f}")
    else:
        state.say(f"epoch {epoch}: loss {record['loss']:.4f}")

    # Order matters for an interruption: weights and the log line first, the state (what resume
    # trusts) last; resume drops log lines past the state's epoch.
    if state.ranks.main:
        run_dir.save_weights(head.out / run_dir.HEAD, head.model.state_dict(), {"epoch": str(epoch)})
        run_dir.append_metrics(head.out, record)
        run_dir.save_state(head.out, head.model, head.optimizer, {
            "epoch": epoch, "iteration": state.iteration, "best_val_oIoU": head.best_oiou, "seed": s.seed,
            "epochs": s.epochs})
    state.ranks.barrier()


def _summary(state: TrainState) -> dict:
    s, head = state.settings, state.head
    history = run_dir.read_metrics(head.out)
    last = history[-1] if history else {}
    return {"run": str(head.out), "head": s.head, "noise_t": s.noise_t, "epochs": last.get("epoch", state.epoch),
            "loss": last.get("loss"), "val": last.get("val"), "best_val_oIoU": head.best_oiou,
            "samples": int(state.n_samples), "parameters": head.parameters, "coverage": state.coverage}


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, leave=False)
