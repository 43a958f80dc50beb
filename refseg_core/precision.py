"""`--dtype fp32` means IEEE float32 on a GPU too.

PyTorch may run float32 matmuls and cuDNN convolutions in TF32 (10-bit mantissa): cuDNN convolutions
do by default, and a program or library may switch matmuls to it (`torch.set_float32_matmul_precision`).
With TF32 allowed, an fp32 VAE encoding of VPD's fixture on an H200 was 1.6e-3 off the CPU's; with it
off, 4.5e-6 (BENCHMARKS.md, "VPD fixture on a GPU"). So while refseg computes in float32 on CUDA, TF32
is off; the previous settings are restored afterwards. bf16/fp16 work is untouched.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def ieee_float32(device: torch.device, dtype: torch.dtype):
    """Within the block, float32 work on CUDA is IEEE float32 (no TF32); elsewhere nothing changes."""
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
