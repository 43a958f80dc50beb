"""The CUDA paths, checked against the CPU (marked `gpu`: skipped without CUDA; bench/gpu_check.sh runs them).

Figures (errors, byte counts) are also appended as JSON lines to $GPU_CHECK_FIGURES when it is set,
so the GPU check reports them next to its timings.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import zarr

from refseg.backbones.loading import load_backbone
from refseg.core.precision import ieee_float32
from refseg.backbones.capture import UNetCapture

pytestmark = pytest.mark.gpu
B, L, IMAGE = 2, 12, 64

# bf16 keeps 8 bits of mantissa: on the CPU, tiny's captured features in bf16 are 1.4-3.9% (relative L2)
# from fp32 and its attention maps 0.2%; the GPU's bf16 kernels may round differently, not worse than this.
BF16_FEATURE_TOLERANCE = 0.08
BF16_ATTENTION_TOLERANCE = 0.02
FP32_TOLERANCE = 1e-4  # TF32 off: the same arithmetic up to summation order


def _record(name: str, **values) -> None:
    path = os.environ.get("GPU_CHECK_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"figure": name, **values}) + "\n")


@pytest.fixture(scope="module")
def cpu_unet():
    return load_backbone("tiny", device="cpu").unet


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([1, 500]), torch.randn(B, L, 32, generator=g)


def _spec(unet):
    from refseg.core.feature_spec import FeatureSpec

    return FeatureSpec.from_unet_config(dict(unet.config), IMAGE, L, 8, (8, 16, 32, 64), (8, 16, 32))


def _capture(unet, inputs, device, dtype):
    z, t, e = inputs
    with UNetCapture(unet, _spec(unet)) as cap:
        got = cap.run(z.to(device, dtype), t.to(device), e.to(device, dtype))
    return {k: v.float().cpu() for k, v in got.items()}


def _relative_errors(got: dict, ref: dict) -> dict:
    return {k: float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref}


def test_capture_on_cuda_fp32_matches_the_cpu(cpu_unet, inputs):
    ref = _capture(cpu_unet, inputs, "cpu", torch.float32)
    with ieee_float32(torch.device("cuda"), torch.float32):
        got = _capture(copy.deepcopy(cpu_unet).cuda(), inputs, "cuda", torch.float32)
    errors = _relative_errors(got, ref)
    _record("capture cuda fp32 vs cpu fp32 (relative L2)", **errors)
    assert max(errors.values()) < FP32_TOLERANCE, errors


def test_capture_on_cuda_bf16_is_within_the_stated_tolerance(cpu_unet, inputs):
    ref = _capture(cpu_unet, inputs, "cpu", torch.float32)
    got = _capture(copy.deepcopy(cpu_unet).to("cuda", torch.bfloat16), inputs, "cuda", torch.bfloat16)
    errors = _relative_errors(got, ref)
    _record("capture cuda bf16 vs cpu fp32 (relative L2)", **errors)
    for name, error in errors.items():
        assert error < (BF16_ATTENTION_TOLERANCE if name.startswith("attn") else BF16_FEATURE_TOLERANCE), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_output_on_cuda_is_unchanged_by_the_capture(cpu_unet, inputs, dtype):
    unet = copy.deepcopy(cpu_unet).to("cuda", dtype)
    z, t, e = (inputs[0].to("cuda", dtype), inputs[1].cuda(), inputs[2].to("cuda", dtype))
    with torch.inference_mode():
        plain = unet(z, t, encoder_hidden_states=e).sample
        again = unet(z, t, encoder_hidden_states=e).sample
    with UNetCapture(unet, _spec(unet)) as cap:
        _, out = cap.run(z, t, e, return_unet_output=True)
    run_to_run = float((again - plain).abs().max())
    _record(f"unet output with capture vs without ({str(dtype)[6:]})", max_abs_difference=float((out - plain).abs().max()),
            run_to_run=run_to_run)
    if run_to_run == 0:  # the kernels are deterministic here: the capture must not change a bit
        assert torch.equal(out, plain)
    else:
        assert float((out - plain).abs().max()) <= run_to_run


def _arrays(path) -> dict[str, bytes]:
    out = {}

    def visit(group, prefix):
        for name, arr in group.arrays():
            out[prefix + name] = np.asarray(arr[...]).tobytes()
        for name, sub in group.groups():
            visit(sub, prefix + name + "/")

    visit(zarr.open_group(str(path), mode="r"), "")
    return out


def test_pipelined_host_copies_write_the_same_cache_bytes(extract_config, tmp_path, monkeypatch):
    import refseg.extract.pipeline as pipeline

    stores = {}
    for overlap in (True, False):
        monkeypatch.setattr(pipeline, "OVERLAP_HOST_COPIES", overlap)
        cfg = extract_config(tmp_path / f"overlap-{overlap}.zarr", device="cuda", dtype="bf16", batch_size=4)
        report = pipeline.run_extraction(cfg)
        assert report.n_samples > 0
        stores[overlap] = _arrays(cfg.out)
    assert stores[True].keys() == stores[False].keys()
    differing = [k for k in stores[True] if stores[True][k] != stores[False][k]]
    _record("cache bytes, pipelined vs synchronous host copies", arrays=len(stores[True]), differing=differing,
            bytes=sum(len(v) for v in stores[True].values()))
    assert differing == []
