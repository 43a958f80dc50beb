"""HostCopies off CUDA: synchronous copies with the same values (the CUDA path needs a GPU: bench/extract.py)."""

import numpy as np
import torch

from refseg.extract.host_copy import HostCopies


def test_cpu_copies_are_synchronous_and_exact():
    copies = HostCopies(torch.device("cpu"))  # overlap asked for, but there is no stream to overlap on
    assert copies.overlap is False
    x = torch.randn(3, 4, dtype=torch.float32).to(torch.float16)
    flags = torch.tensor([[True, False]])
    host = copies.finish(copies.start({"x": x, ("stats", "finite"): flags}))
    assert isinstance(host["x"], np.ndarray) and host["x"].dtype == np.float16
    assert host["x"].tobytes() == x.numpy().tobytes() and host[("stats", "finite")].tolist() == [[True, False]]
    z = copies.to_device(torch.tensor([1.0, 2.5]), torch.bfloat16)
    assert z.dtype == torch.bfloat16 and z.tolist() == [1.0, 2.5]
