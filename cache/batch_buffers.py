"""Output arrays for a dataset's batches, reused once nothing holds them any more.

Why: a training batch of SD1.5 features is ~40 MB. Read into new arrays, every batch pays the kernel
for fresh pages (a page fault and zeroing per 4 KiB) and the checksum then reads memory no cache holds;
read into the arrays of a batch already dropped, it pays neither. That was a fifth of the loader's time
on a page-cache-warm store (bench/read.py, BENCHMARKS.md "Cache reads").

A batch's tensors are handed out as `torch.from_numpy(view)`, `view` a fresh ndarray over the pooled
array: torch keeps `view` alive for as long as any tensor on that memory lives (views and items
included), so a dead weak reference to `view` means nobody can see the array, and it is reused. A
batch a caller keeps is never written into.

In a DataLoader worker process the arrays are torch shared memory instead, never reused: the batch then
travels to the main process without torch's copy into shared memory, and the main process may still hold
it when the worker reads its next batch (a weak reference cannot see across processes).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

POOLED_PER_SHAPE = 4  # batches of one shape alive at once in a training loop: the step's, the next, a spare


class BatchBuffers:
    """`take(shape, dtype)` -> (array to read into, the tensor over it to hand out). Thread-safe: threads
    reading items of one dataset at once never get the same array. `shared`: the process is a DataLoader
    worker (new shared memory every time, nothing pooled)."""

    def __init__(self, shared: bool = False, per_shape: int = POOLED_PER_SHAPE):
        self.shared = bool(shared)
        self.per_shape = int(per_shape)
        self._pools: dict[tuple, list[list]] = {}  # (shape, dtype) -> [[array, weakref to its handed-out view]]
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype) -> tuple[np.ndarray, torch.Tensor]:
        dtype = np.dtype(dtype)
        if self.shared:
            return _shared(shape, dtype)
        with self._lock:  # a free slot is claimed (its weak reference set) before another thread looks
            pool = self._pools.setdefault((tuple(shape), dtype.str), [])
            slot = next((s for s in pool if s[1]() is None), None)
            if slot is None:
                slot = [np.empty(shape, dtype), None]
                if len(pool) < self.per_shape:
                    pool.append(slot)  # else: every pooled array is held, and this one is not kept
            view = slot[0].view()
            slot[1] = weakref.ref(view)
        return view, torch.from_numpy(view)


def _shared(shape: tuple, dtype: np.dtype) -> tuple[np.ndarray, torch.Tensor]:
    """A new array in torch shared memory (what torch's `default_collate` stacks into in a worker)."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    tensor = torch.empty(0, dtype=torch_dtype).set_(storage, 0, tuple(shape))
    return tensor.numpy(), tensor
