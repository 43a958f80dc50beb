"""`ieee_float32`: --dtype fp32 on CUDA runs without TF32, and the process's own settings come back after."""

from __future__ import annotations

import pytest
import torch

from refseg.core.precision import ieee_float32


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    saved = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as some GPU images start
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_float32_on_cuda_turns_tf32_off_and_restores_it(tf32_on):
    with ieee_float32(torch.device("cuda"), torch.float32):
        assert _flags() == (False, False)
    assert _flags() == (True, True)
    with pytest.raises(RuntimeError), ieee_float32(torch.device("cuda:1"), torch.float32):
        raise RuntimeError("an error inside still restores the settings")
    assert _flags() == (True, True)


@pytest.mark.parametrize("device, dtype", [("cuda", torch.bfloat16), ("cuda", torch.float16), ("cpu", torch.float32)])
def test_other_work_is_left_alone(tf32_on, device, dtype):
    with ieee_float32(torch.device(device), dtype):
        assert _flags() == (True, True)


def test_head_dtype_is_checked_and_reaches_the_autocast_policy():
    from refseg.core.errors import RefsegError
    from refseg.heads.batches import autocast
    from refseg.heads.settings import EvalSettings

    with pytest.raises(RefsegError, match="unknown --head-dtype 'fp16' \\(choose auto or fp32\\)"):
        EvalSettings(run="r", cache="c", head_dtype="fp16").check()
    assert "head_dtype" in EvalSettings.PREDICT  # heads.evaluate.predict(..., head_dtype="fp32")
    assert autocast(torch.device("cpu")).fast_dtype == torch.bfloat16  # the policy's type, disabled on CPU
    assert not autocast(torch.device("cpu"), "auto")._enabled
    assert not autocast(torch.device("cuda"), "fp32")._enabled
