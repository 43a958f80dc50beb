"""A sweep's plan, made before anything is written: how many heads, in how many passes, and how much
memory each takes (`refseg-sweep --dry-run` prints it and stops).

A pass trains heads that share a batch stream (`Job.stream`) together; a stream whose heads would not
fit in memory at once is split into several passes of the same stream, each reading the batches
again. Each head sees the same batches in the same order either way, so its weights are the bytes of
its solo run whatever the passes (tests/test_sweep_plan.py). Run folders are made pass by pass, so a
sweep stopped early leaves only the folders of the passes it started.

Memory per head is an estimate, stated as one: float32 weights, gradients and two Adam moments (16
bytes per parameter), plus a batch of the head's input tensors in float32 three times over (inputs,
activations, their gradients). The budget is half the available RAM, as training's preload uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from refseg.core.memory import available_memory
from refseg.heads import train_setup

BYTES_PER_PARAMETER = 16  # float32 weight, gradient and two Adam moments
ACTIVATION_COPIES = 3  # a batch of inputs, the activations it makes, their gradients (an estimate)


@dataclass
class SweepPlan:
    jobs: int
    done: int  # heads whose runs hold every epoch already
    streams: int
    passes: list  # [[Job, ...], ...] in training order, finished heads left out
    head_bytes: dict = field(default_factory=dict)  # job name -> estimated bytes while training
    budget: int | None = None  # bytes a pass may take (None: unknown, one pass per stream)

    def lines(self) -> list[str]:
        todo = self.jobs - self.done
        largest = max((sum(self.head_bytes[j.name] for j in p) for p in self.passes), default=0)
        budget = "unknown (no limit)" if self.budget is None else _gb(self.budget)
        out = [f"sweep plan: {self.jobs} heads ({self.done} done already, {todo} to train) on {self.streams} batch "
               f"stream(s), in {len(self.passes)} pass(es)",
               f"  memory: about {_gb(max(self.head_bytes.values(), default=0))} per head at most, the largest pass "
               f"{_gb(largest)}, budget {budget} (half the available RAM)"]
        for k, heads in enumerate(self.passes[:20], 1):
            s = heads[0].settings
            out.append(f"  pass {k}: T={s.noise_t}, batch {s.batch_size}, {len(heads)} heads, about "
                       f"{_gb(sum(self.head_bytes[j.name] for j in heads))}")
        if len(self.passes) > 20:
            out.append(f"  ... {len(self.passes) - 20} more passes")
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan(jobs: list, specs: dict, done: set[str], budget: int | None = None) -> SweepPlan:
    """Group `jobs` into passes that fit `budget` bytes (default: half the available RAM).

    `specs`: training cache path -> its FeatureSpec; `done`: names of the jobs that are finished.
    """
    if budget is None:
        available = available_memory()
        budget = None if available is None else available // 2
    head_bytes = estimate_bytes(jobs, specs)
    streams: dict[tuple, list] = {}
    for job in jobs:
        streams.setdefault(job.stream(), []).append(job)
    passes = []
    for stream in streams.values():
        todo = [job for job in stream if job.name not in done]
        current, used = [], 0
        for job in todo:
            need = head_bytes[job.name]
            if current and budget is not None and used + need > budget:
                passes.append(current)
                current, used = [], 0
            current.append(job)
            used += need
        if current:
            passes.append(current)
    return SweepPlan(len(jobs), len(done), len(streams), passes, head_bytes, budget)


def estimate_bytes(jobs: list, specs: dict) -> dict:
    """Job name -> estimated training memory; each distinct head is built once to count its parameters."""
    by_kind: dict[str, int] = {}
    out = {}
    for job in jobs:
        spec = specs[str(job.settings.cache)]
        kind = json.dumps([job.settings.head, job.settings.text_blind, job.head_args, str(job.settings.cache)],
                          sort_keys=True, default=str)
        if kind not in by_kind:
            model = train_setup.build_for_training(job.settings, job.head_args, spec)
            parameters = sum(p.numel() for p in model.parameters())
            inputs = sum(math.prod(spec[name].shape) for name in model.tensor_names)
            by_kind[kind] = parameters * BYTES_PER_PARAMETER, inputs * 4 * ACTIVATION_COPIES
        weights, per_sample = by_kind[kind]
        out[job.name] = weights + per_sample * job.settings.batch_size
    return out
