"""Joint-attention capture (backbones/joint_capture.py) on tiny-sd3 and tiny-flux.

The captured hidden states equal plain forward hooks; the maps equal the image->text block of the
full softmax(QKᵀ) over the joint sequence, recomputed naively (materialised) from the layer's weights
and renormalised over the text keys; the transformer's output is unchanged by capture; chunking
changes nothing."""

from __future__ import annotations

import pytest
import torch

from refseg.backbones.families import FAMILIES
from refseg.backbones.joint_capture import capture_peak_bytes, text_attention_probs

IMAGE, TOKENS = 64, 6
SENTENCES = ["the red circle left of the square", "a big blue star"]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model(request):
    torch.manual_seed(0)
    family = FAMILIES[request.param]
    components = family.build_tiny(0)
    text = family.encode_text(components, family.tokenize(components, SENTENCES, TOKENS))
    latents = torch.randn(2, family.latent_channels(components), IMAGE // 8, IMAGE // 8)
    noise = family.noise_input(components, t=300)
    return family, components, text, latents, noise


def all_blocks(family, components):
    from refseg.core.feature_spec import TransformerBlocks

    return TransformerBlocks.from_config(dict(components["transformer"].config)).ids


def test_features_equal_forward_hooks_and_output_is_unchanged(model):
    family, components, text, latents, noise = model
    blocks = all_blocks(family, components)
    spec = family.spec(components, IMAGE, TOKENS, blocks=blocks, attn_blocks=blocks)
    transformer = components["transformer"]
    hooked, handles = {}, []
    for info in spec.features:
        def hook(module, args, output, name=info.name):
            hooked[name] = output[1].detach().clone()  # (text, image) pair: the image tokens
        handles.append(transformer.get_submodule(info.modules[0]).register_forward_hook(hook))
    with torch.inference_mode():
        reference = family.forward(components, latents, noise, text)
    for h in handles:
        h.remove()
    with family.capture(components, spec) as cap:
        captured, output = cap.run(latents, noise, text, return_output=True)
    assert torch.equal(output, reference)  # bit-identical with capture on
    side = IMAGE // 16
    for info in spec.features:
        tokens = hooked[info.name]
        assert captured[info.name].shape == (2, info.channels, side, side)
        assert torch.equal(captured[info.name], tokens.transpose(1, 2).reshape(2, -1, side, side))
    for info in spec.attention:
        assert captured[info.name].shape == (2, spec.token_length, side, side)
        torch.testing.assert_close(captured[info.name].sum(1), torch.ones(2, side, side))
    # the processors are restored: a plain forward again gives the same output
    with torch.inference_mode():
        assert torch.equal(family.forward(components, latents, noise, text), reference)


def naive_maps(attn, inputs: dict, text_length: int, order: str) -> torch.Tensor:
    """The full joint softmax(QKᵀ/√d) materialised, its image-query x text-key block renormalised: (B, N, L)."""
    from diffusers.models.embeddings import apply_rotary_emb

    hidden, context = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    heads = attn.heads
    d = attn.to_q.out_features // heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, d)

    def norm(module, x):
        return x if module is None else module(x)

    q, k = norm(attn.norm_q, split(attn.to_q(hidden))), norm(attn.norm_k, split(attn.to_k(hidden)))
    if context is not None:
        cq = norm(attn.norm_added_q, split(attn.add_q_proj(context)))
        ck = norm(attn.norm_added_k, split(attn.add_k_proj(context)))
        q, k = (torch.cat([q, cq], 1), torch.cat([k, ck], 1)) if order == "image_first" else \
            (torch.cat([cq, q], 1), torch.cat([ck, k], 1))
    rotary = inputs.get("image_rotary_emb")
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    full = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()).mul(d**-0.5).softmax(-1)  # (B, h, S, S)
    n = full.shape[-1] - text_length
    block = full[..., :n, n:] if order == "image_first" else full[..., text_length:, :text_length]
    return (block / block.sum(-1, keepdim=True)).mean(1)


def test_maps_equal_naive_softmax_of_the_layer(model):
    family, components, text, latents, noise = model
    blocks = all_blocks(family, components)
    spec = family.spec(components, IMAGE, TOKENS, blocks=(), attn_blocks=blocks)
    transformer = components["transformer"]
    inputs, handles = {}, []
    for info in spec.attention:
        def pre_hook(module, args, kwargs, name=info.name):
            names = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
            inputs[name] = {**dict(zip(names, args)), **kwargs}
        handles.append(transformer.get_submodule(info.modules[0]).register_forward_pre_hook(pre_hook, with_kwargs=True))
    with family.capture(components, spec) as cap:
        captured = cap.run(latents, noise, text)
    for h in handles:
        h.remove()
    order = "image_first" if family.name == "sd3" else "text_first"
    side = IMAGE // 16
    for info in spec.attention:
        attn = transformer.get_submodule(info.modules[0])
        with torch.inference_mode():
            expected = naive_maps(attn, inputs[info.name], spec.token_length, order)
        got = captured[info.name].flatten(2).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert captured[info.name].shape == (2, spec.token_length, side, side)


def test_chunking_gives_the_maps_of_one_chunk(model):
    family, components, text, latents, noise = model
    transformer = components["transformer"]
    attn = transformer.get_submodule(family.spec(components, IMAGE, TOKENS).attention[0].modules[0])
    torch.manual_seed(1)
    width = attn.to_q.in_features
    image, context = torch.randn(2, 16, width), torch.randn(2, 5, width)
    rotary = None
    if family.name == "flux":
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        ids = torch.cat([torch.zeros(5, 3), torch.stack(grid, -1).reshape(16, 3)])  # text, then the 4x4 image
        rotary = transformer.pos_embed(ids)
    with torch.inference_mode():
        one = text_attention_probs(attn, image, context, added=True, rotary=rotary, chunk=16)
        for chunk in (1, 3, 7):
            chunked = text_attention_probs(attn, image, context, added=True, rotary=rotary, chunk=chunk)
            torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-7)
    assert one.shape == (2, 16, 5)


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    from refseg.backbones.families.flux import latent_image_ids, pack_latents, unpack_latents

    z = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack_latents(z), FluxPipeline._pack_latents(z, 2, 16, 8, 6))
    assert torch.equal(latent_image_ids(z, torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, z.device, torch.float32))
    assert torch.equal(unpack_latents(pack_latents(z), z.shape), z)
    assert torch.equal(FluxPipeline._unpack_latents(pack_latents(z), 64, 48, 8), z)


def test_flux_1024_capture_peak_fits_80_gb():
    from bench.families import flux_capture_peak

    peak = flux_capture_peak(image_size=1024, token_length=512, batch=1)
    assert 24e9 < peak["total"] < 80e9  # weights alone are ~24 GB in bf16
    # recording one map costs far less than the naive (text+image)^2 map of that layer
    assert peak["capture_layer"] < peak["full_map_per_layer"] / 4
    small = capture_peak_bytes(params=0, hidden=3072, heads=24, image_tokens=4096, text_tokens=512,
                               n_features=0, n_maps=1, chunk=256)
    big = capture_peak_bytes(params=0, hidden=3072, heads=24, image_tokens=4096, text_tokens=512,
                             n_features=0, n_maps=1, chunk=1024)
    assert big["capture_layer"] - small["capture_layer"] == 3 * 24 * (1024 - 256) * 512 * 4


@pytest.mark.gpu
def test_cuda_bf16_capture_leaves_the_output_and_agrees_with_the_cpu(model):
    """On CUDA in bf16 (extraction's GPU set-up): output bit-identical with capture on, maps a distribution
    over the tokens and within bf16's rounding of the CPU fp32 maps."""
    import copy

    family, components, text, latents, noise = model
    spec = family.spec(components, IMAGE, TOKENS)
    with family.capture(components, spec) as cap:
        on_cpu = cap.run(latents, noise, text)
    gpu = dict(components, transformer=copy.deepcopy(components["transformer"]).to("cuda", torch.bfloat16))
    text_gpu = type(text)(text.embedding.to("cuda", torch.bfloat16), text.pooled.to("cuda", torch.bfloat16))
    with torch.inference_mode():
        reference = family.forward(gpu, latents.cuda(), noise, text_gpu)
    with family.capture(gpu, spec) as cap:
        captured, output = cap.run(latents.cuda(), noise, text_gpu, return_output=True)
    assert torch.equal(output, reference)
    for info in spec.attention:
        maps = captured[info.name].cpu()
        torch.testing.assert_close(maps.sum(1), torch.ones_like(maps.sum(1)), rtol=0, atol=1e-5)
        assert (maps - on_cpu[info.name]).norm() / on_cpu[info.name].norm() < 0.05
