import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from _capture_util import plain_unet_forward
from refseg.backbones.capture import UNetCapture
from refseg.backbones.loading import load_backbone
from refseg.core.feature_spec import FeatureSpec

B, L = 2, 12


@pytest.fixture(scope="module")
def unet():
    return load_backbone("tiny", device="cpu").unet


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([1, 500]), torch.randn(B, L, 32, generator=g)


def _spec(unet, image=64, strides=(8, 16, 32, 64), attn_strides=(8, 16, 32)):
    return FeatureSpec.from_unet_config(dict(unet.config), image, L, 8, strides, attn_strides)


def test_features_equal_plain_forward_hooks(unet, inputs):
    spec = _spec(unet)
    modules = [t.modules[0] for t in spec.features]
    assert modules == ["up_blocks.0.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1", "up_blocks.3"]
    _, plain, _ = plain_unet_forward(unet, *inputs, modules=modules)
    with UNetCapture(unet, spec) as cap:
        captured = cap.run(*inputs)
    assert list(captured) == spec.names
    for info in spec.features:
        got = captured[info.name]
        assert got.dtype == torch.float32 and got.shape == (B, *info.shape)
        assert torch.equal(got, plain[info.modules[0]])


def test_attention_maps_equal_softmax_qk_recomputed_from_the_layers(unet, inputs):
    spec = _spec(unet)
    attn_modules = [m for t in spec.attention for m in t.modules]
    assert all(m.endswith("attn2") for m in attn_modules)
    _, _, seen = plain_unet_forward(unet, *inputs, attn_modules=attn_modules)
    with UNetCapture(unet, spec) as cap:
        captured = cap.run(*inputs)
    for info in spec.attention:
        maps = []
        for name in info.modules:
            attn = unet.get_submodule(name)
            x, text = seen[name]
            q, k = attn.to_q(x), attn.to_k(text)
            heads, d = attn.heads, q.shape[-1] // attn.heads
            q = q.view(B, -1, heads, d).transpose(1, 2)
            k = k.view(B, -1, heads, d).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1).mean(1)  # (B, HW, L)
            maps.append(probs.transpose(1, 2).reshape(B, L, info.size, info.size))
        expected = torch.stack(maps).mean(0)
        got = captured[info.name]
        assert got.shape == (B, L, info.size, info.size) and cap.layer_calls[info.name] == len(info.modules) == 5
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.sum(1), torch.ones(B, info.size, info.size))  # a distribution over tokens


def test_unet_output_unchanged_and_unet_restored(unet, inputs):
    spec = _spec(unet)
    attn_modules = [m for t in spec.attention for m in t.modules]
    before = {name: unet.get_submodule(name).processor for name, _ in unet.named_modules() if name.endswith(("attn1", "attn2"))}
    reference, _, _ = plain_unet_forward(unet, *inputs)
    with UNetCapture(unet, spec) as cap:
        for name, processor in before.items():  # only the listed attn2 layers are swapped
            assert (unet.get_submodule(name).processor is processor) == (name not in attn_modules)
        captured, out = cap.run(*inputs, return_unet_output=True)
    assert torch.equal(out, reference)  # bit-identical, not merely close
    assert all(unet.get_submodule(name).processor is p for name, p in before.items())
    assert all(not m._forward_hooks for m in unet.modules())
    again, _, _ = plain_unet_forward(unet, *inputs)
    assert torch.equal(again, reference)


def test_stops_early_once_everything_is_captured(unet, inputs):
    spec = _spec(unet, strides=(16, 32, 64), attn_strides=(16, 32))
    calls = []
    handle = unet.up_blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        with UNetCapture(unet, spec) as cap:
            early = cap.run(*inputs)
            assert calls == []  # the stride-8 decoder level never ran
            full, _ = cap.run(*inputs, return_unet_output=True)
    finally:
        handle.remove()
    assert calls == [1]
    assert all(torch.equal(early[k], full[k]) for k in spec.names)


def test_run_outside_the_context_is_an_error(unet, inputs):
    with pytest.raises(RuntimeError, match="inside `with UNetCapture"):
        UNetCapture(unet, _spec(unet)).run(*inputs)


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def test_stable_diffusion_15_layout():
    """VPD's channels and SD1.5's 5 attn2 layers per stride, on a randomly initialised SD1.5 UNet (~3.4 GB)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    try:
        spec = FeatureSpec.from_unet_config(dict(unet.config), 128, 40)
        assert {t.name: t.channels for t in spec.features} == {"s64": 1280, "s32": 1280, "s16": 640, "s8": 320}
        latents, text = torch.randn(1, 4, 16, 16), torch.randn(1, 40, 768)
        with UNetCapture(unet, spec) as cap:
            captured = cap.run(latents, torch.tensor([1]), text)
        assert cap.layer_calls == {"attn_s32": 5, "attn_s16": 5}
        assert {k: tuple(v.shape) for k, v in captured.items()} == {
            "s8": (1, 320, 16, 16), "s16": (1, 640, 8, 8), "s32": (1, 1280, 4, 4), "s64": (1, 1280, 2, 2),
            "attn_s16": (1, 40, 8, 8), "attn_s32": (1, 40, 4, 4)}
        assert all(torch.isfinite(v).all() for v in captured.values())
        torch.testing.assert_close(captured["attn_s16"].sum(1), torch.ones(1, 8, 8))
    finally:
        del unet
        gc.collect()


def test_a_compiled_unet_traces_as_one_graph_with_the_capture(unet, inputs):
    """unet.compile() with the capture: no early exit (it would split the graph), no recompiles,
    and the same tensors as the eager capture. The eager backend: dynamo's tracing without codegen."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    spec = _spec(unet, strides=(16, 32, 64), attn_strides=(16, 32))  # eager capture would stop early
    with UNetCapture(unet, spec) as cap:
        expected = [cap.run(*inputs)]
        expected.append(cap.run(inputs[0] * 2, inputs[1], inputs[2] + 1))
    compiled = copy.deepcopy(unet)
    compiled.compile(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        with UNetCapture(compiled, spec) as cap:
            got = [cap.run(*inputs), cap.run(inputs[0] * 2, inputs[1], inputs[2] + 1), cap.run(*inputs)]
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    for g, e in zip(got, [*expected, expected[0]]):
        assert list(g) == spec.names
        for name in spec.names:
            torch.testing.assert_close(g[name], e[name], rtol=1e-5, atol=1e-6)
