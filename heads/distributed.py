"""Head training under `torchrun`: one process per device, DDP, each global batch split across ranks.

`--batch-size` stays the GLOBAL batch. Every rank draws the same epoch permutation (EpochShuffle) and
takes its share of each batch of it (`batch[rank::world]`), so a run under `torchrun
--nproc_per_node W` is the same experiment as one process: the same samples per optimizer step, the
same number of steps, the same lr schedule. Each rank's loss is its part of the global batch's loss:
the class-weighted cross-entropy is divided by the whole batch's class-weight total (and Dice by its
sample count), both all-reduced, and multiplied by W because DDP averages the gradients over ranks.
So the gradient is the one-process gradient, and the weights agree with a one-process run up to the
order of float additions (tests/test_heads_ddp.py). A last batch with fewer samples than ranks gives
the ranks left out one sample with weight 0: every rank must take part in every all-reduce.

BatchNorm (the `vpd`/`film` decoders, `linear`'s input norm): on CUDA the layers become SyncBatchNorm,
which normalises with the global batch's statistics; on the CPU (gloo) PyTorch has no SyncBatchNorm,
so each rank normalises with its share's statistics, and such heads then differ from a one-process
run by more than float order. A placeholder sample (above) enters SyncBatchNorm's statistics.

Rank 0 alone writes the run directory and evaluates on val; the others wait for it at a barrier.
Launched without torchrun (no WORLD_SIZE in the environment), nothing here changes the one-process
loop. Backend: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False  # this object started the process group (so `stop` ends it)

    @classmethod
    def from_env(cls) -> "Ranks":
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(rank=int(env.get("RANK", 0)), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", world)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (once); -> this rank's device."""
        if not self.active:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        return device

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DDP around `model`; on CUDA its BatchNorm layers first become SyncBatchNorm (in place), so
        they normalise with the global batch's statistics as one process would."""
        if not self.active:
            return model
        if device.type == "cuda":  # a head is a container: its BatchNorm children are swapped in place
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def share(self, batch_size: int) -> int:
        """How many of a global batch of `batch_size` samples this rank trains on (0: a placeholder)."""
        return len(range(self.rank, batch_size, self.world))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class RankBatches(torch.utils.data.Sampler):
    """Batches of dataset indices for one rank: its share of each global batch of `order`'s epoch
    permutation, or the batch's first sample as a placeholder (weight 0) when the share is empty."""

    def __init__(self, order, batch_size: int, ranks: Ranks):
        self.order, self.batch_size, self.ranks = order, int(batch_size), ranks

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self):
        perm = list(self.order)
        for start in range(0, len(perm), self.batch_size):
            batch = perm[start:start + self.batch_size]
            mine = batch[self.ranks.rank::self.ranks.world]
            yield mine if mine else batch[:1]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)
