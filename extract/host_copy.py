"""Device-to-host copies of a batch's results that do not stop the GPU.

The extraction loop is software-pipelined: it launches batch i+1 on the device, then waits for
batch i's results on the host and hands them to the cache writer. On CUDA, `HostCopies.start`
queues the copies on a side stream into pinned (page-locked) host memory, after the compute that
produces them, and records an event; `finish` waits for that event only. So the GPU computes batch
i+1 while batch i crosses PCIe and is copied into its shard on the CPU, instead of idling through a
synchronous `.cpu()` and the host-side work after it.

On any other device (and with `overlap=False`), `start` copies synchronously; `finish` then only
turns the tensors into numpy arrays. The values are the same either way: a copy, no arithmetic.
"""

from __future__ import annotations

import torch


class HostCopies:
    """`pending = copies.start({key: tensor})` ... `copies.finish(pending)` -> {key: numpy array}.

    The arrays `finish` returns are views of fresh host tensors (pinned on CUDA): torch's caching host
    allocator gives a pinned block to a later batch only once its tensor is freed, and a view keeps it
    alive, so `ShardBuffer.add_rows` may hand them to the writer without copying.
    """

    def __init__(self, device: torch.device, overlap: bool = True):
        self.device = torch.device(device)
        self.overlap = bool(overlap) and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.overlap else None

    def start(self, tensors: dict) -> tuple:
        if not self.overlap:
            return {k: v.cpu() for k, v in tensors.items()}, None
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # the copies start once the results exist
        host = {}
        with torch.cuda.stream(self._stream):
            for k, v in tensors.items():
                # pinned blocks come from torch's caching host allocator, which reuses a block only
                # after the copy recorded on it has finished
                host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                host[k].copy_(v, non_blocking=True)
                v.record_stream(self._stream)  # keep the device memory until the copy has read it
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done

    @staticmethod
    def finish(pending: tuple) -> dict:
        host, done = pending
        if done is not None:
            done.synchronize()
        return {k: v.numpy() for k, v in host.items()}

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor on the device; on CUDA from pinned memory without blocking the host, so the
        loop can queue a batch behind the one still computing."""
        if self.overlap:  # the dtype conversion runs on the device, after the copy
            return tensor.pin_memory().to(self.device, non_blocking=True).to(dtype)
        return tensor.to(self.device, dtype)
