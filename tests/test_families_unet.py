"""UNet families behind the family seam (backbones/families/): SD2.x and SDXL at toy size.

For each: the topology facts the family promises, text conditioning as diffusers' own pipeline builds
it, capture exactness (hooks, softmax(QKᵀ) from the layers' weights, output unchanged), loading forms,
and refseg-extract -> refseg-train-head -> refseg-eval on the tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _capture_util import plain_unet_forward
from _families_util import extract_splits, train_and_evaluate
from refseg.backbones.families import FAMILIES, family_for_index, tiny_names
from refseg.backbones.loading import load_backbone, save_backbone
from refseg.core.errors import ModelError

B, L = 2, 8


@pytest.fixture(scope="module")
def sd2():
    return load_backbone("tiny-sd2", device="cpu")


@pytest.fixture(scope="module")
def sdxl():
    return load_backbone("tiny-sdxl", device="cpu")


def _text(backbone, texts=("the red dog on the left", "a cat")):
    with torch.inference_mode():
        return backbone.encode(backbone.tokenize(list(texts), L))


# ---- registry and topology --------------------------------------------------------------------------

def test_registry_names_and_detection():
    assert {"sd", "sd2", "sdxl"} <= set(FAMILIES)
    names = tiny_names()
    assert names["tiny"].name == "sd" and names["tiny-sd2"].name == "sd2" and names["tiny-sdxl"].name == "sdxl"
    assert family_for_index({"_class_name": "StableDiffusionPipeline"}).name == "sd"
    assert family_for_index({"_class_name": "StableDiffusionXLPipeline"}).name == "sdxl"
    assert family_for_index({"_class_name": "KandinskyPipeline"}) is None


def test_sd2_topology_and_identity(sd2):
    te, unet = sd2.text_encoder.config, sd2.unet.config
    assert sd2.family.name == "sd2"
    assert te.hidden_act == "gelu" and te.hidden_size == unet.cross_attention_dim  # OpenCLIP as diffusers ships it
    assert list(unet.attention_head_dim) == [1, 2, 4, 4] and unet.use_linear_projection  # heads per level
    assert sd2.tokenizer.pad_token == "!"
    assert sd2.default_image_size == 768  # v-prediction SD2.x
    # no "family" key: SD2 caches made before families existed keep their fingerprint; the scheduler says v
    assert "family" not in sd2.identity and sd2.identity["scheduler"]["prediction_type"] == "v_prediction"
    spec = sd2.spec(64, L)
    assert spec.names == ["s8", "s16", "s32", "s64", "attn_s16", "attn_s32"] and spec.text_dim == 48


def test_sdxl_topology_and_spec(sdxl):
    assert sdxl.family.name == "sdxl" and sdxl.identity["family"] == "sdxl"
    assert sdxl.scaling_factor == 0.13025 and sdxl.default_image_size == 1024 and sdxl.max_stride == 32
    assert list(sdxl.unet.config.transformer_layers_per_block) == [1, 2, 10]
    spec = sdxl.spec(64, L)  # the family's default layers
    assert spec.names == ["s8", "s16", "s32", "attn_s16", "attn_s32"]
    # 2 down x 2 + 3 up x 2 transformer layers at stride 16; 2 x 10 + 3 x 10 at stride 32; none at 8
    assert len(spec["attn_s16"].modules) == 10 and len(spec["attn_s32"].modules) == 50
    assert spec["s8"].modules == ("up_blocks.2",) and spec["s32"].modules == ("up_blocks.0.attentions.1",)
    with pytest.raises(ModelError, match="no cross-attention layers at stride 8"):
        sdxl.spec(64, L, attn_strides=(8,))
    with pytest.raises(ModelError, match="feature stride 64 does not exist"):
        sdxl.spec(64, L, strides=(64,))


def test_sdxl_text_and_time_ids_as_the_diffusers_pipeline_builds_them(sdxl):
    from diffusers import StableDiffusionXLPipeline

    from refseg.backbones.families.sdxl import time_ids

    c = sdxl.components
    pipe = StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                     tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                     scheduler=__import__("diffusers").DDPMScheduler(**sdxl.scheduler_config))
    prompts = ["the red dog on the left", "a cat"]
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ours = sdxl.encode(sdxl.tokenize(prompts, 77))  # the pipeline's 77 tokens
    assert ours.embedding.shape == (2, 77, 80) and ours.pooled.shape == (2, 48)  # 32 + 48 wide; G's projection
    assert torch.equal(ours.embedding, embeds) and torch.equal(ours.pooled, pooled)
    expected = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=48)
    assert torch.equal(time_ids(64, 2, torch.float32, "cpu"), expected.repeat(2, 1))


# ---- capture: hooks, softmax(QKᵀ) from the weights, output unchanged ------------------------------------

def _plain(backbone, latents, steps, text, modules, attn_modules):
    """The UNet without capture, with ordinary hooks and the family's added conditioning."""
    added = backbone.family.added_cond_kwargs(backbone.components, text, latents)
    return plain_unet_forward(backbone.unet, latents, steps, text.embedding, modules, attn_modules,
                              **({} if added is None else {"added_cond_kwargs": added}))


def _softmax_qk(attn, hidden, context) -> torch.Tensor:
    """softmax(Q·Kᵀ/sqrt(d)) from the layer's own projections, averaged over heads: (B, HW, L)."""
    q, k = attn.to_q(hidden).float(), attn.to_k(context).float()
    b, d = q.shape[0], q.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    return ((q @ k.transpose(-1, -2)) / d**0.5).softmax(-1).mean(1)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_capture_equals_hooks_and_recomputed_softmax_and_leaves_the_output(name, request):
    backbone = request.getfixturevalue(name)
    spec = backbone.spec(64, L, strides=backbone.family.default_strides, attn_strides=(16, 32))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B, 4, 8, 8, generator=g)
    noise = backbone.noise_input(t=500)
    text = _text(backbone)
    steps = torch.full((B,), 500)
    modules = [t.modules[0] for t in spec.features]
    attn_modules = [m for t in spec.attention for m in t.modules]
    plain_out, plain, attn_in = _plain(backbone, latents, steps, text, modules, attn_modules)
    with backbone.capture(spec) as cap:
        captured, out = cap.run(latents, noise, text, return_output=True)
    assert torch.equal(out, plain_out)  # capture changes nothing the model computes
    for info in spec.features:
        assert torch.equal(captured[info.name], plain[info.modules[0]])
    for info in spec.attention:
        maps = [_softmax_qk(backbone.unet.get_submodule(m), *attn_in[m]) for m in info.modules]
        expected = torch.stack(maps).mean(0).transpose(1, 2).reshape(B, L, info.size, info.size)
        assert captured[info.name].shape == (B, L, info.size, info.size)
        torch.testing.assert_close(captured[info.name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(captured[info.name].sum(1), torch.ones(B, info.size, info.size))
    # restored: the processors are the model's own again
    assert not any(type(p).__name__ == "_RecordingProcessor" for p in backbone.unet.attn_processors.values())


# ---- loading forms ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, pipeline", [("tiny-sd2", "StableDiffusionPipeline"),
                                             ("tiny-sdxl", "StableDiffusionXLPipeline")])
def test_folder_round_trip(model, pipeline, tmp_path, request):
    import diffusers

    original = request.getfixturevalue(model.removeprefix("tiny-"))
    folder = save_backbone(original, tmp_path / model)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline
    loaded = load_backbone(str(folder), device="cpu")
    assert loaded.family.name == original.family.name  # SD2: told from SD1 by its text encoder
    assert loaded.identity["weights_sha256"] == original.identity["weights_sha256"]
    assert {k: v for k, v in loaded.identity.items() if k not in ("model", "kind")} == \
        {k: v for k, v in original.identity.items() if k not in ("model", "kind")}
    ours, theirs = _text(loaded), _text(original)
    assert torch.equal(ours.embedding, theirs.embedding)
    # diffusers' own pipeline class loads the folder too
    pipe = getattr(diffusers, pipeline).from_pretrained(str(folder), local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_hub_id_offline_is_a_one_line_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_backbone("refseg-test/no-such-sdxl-model", device="cpu")


def _openclip_key(key: str) -> str | None:
    """A diffusers CLIPTextModel key as SD2's original checkpoint names it under cond_stage_model.model.
    (the inverse of diffusers' `convert_open_clip_checkpoint`; q/k/v are fused into in_proj by the caller)."""
    key = key if key.startswith("text_model.") else "text_model." + key
    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    if key in top or "position_ids" in key:
        return top.get(key)
    key = key.replace("text_model.encoder.layers.", "transformer.resblocks.")
    for hf, ldm in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."),
                    (".self_attn", ".attn")):
        key = key.replace(hf, ldm)
    return key


def _openclip(text_encoder, prefix: str) -> dict:
    """An OpenCLIP text tower's original keys under `prefix` (q/k/v fused into in_proj, projection transposed)."""
    out, fused = {}, {}
    for k, v in text_encoder.state_dict().items():
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
            continue
        key = _openclip_key(k)
        proj = next((p for p in ("q_proj", "k_proj", "v_proj") if key and f".attn.{p}." in key), None)
        if proj:
            base, kind = key.split(f".attn.{proj}.")
            fused.setdefault((base, kind), {})[proj] = v
        elif key:
            out[prefix + key] = v.clone().contiguous()
    for (base, kind), p in fused.items():
        out[f"{prefix}{base}.attn.in_proj_{kind}"] = torch.cat([p["q_proj"], p["k_proj"], p["v_proj"]])
    return out


def _sd2_checkpoint(backbone) -> dict:
    """SD2.x's original single-file layout: LDM UNet and VAE keys, OpenCLIP text encoder keys."""
    from _backbone_util import to_ldm_state_dict

    out = {k: v for k, v in to_ldm_state_dict(backbone.unet, backbone.vae, backbone.text_encoder).items()
           if not k.startswith("cond_stage_model.")}
    return {**out, **_openclip(backbone.text_encoder, "cond_stage_model.model.")}


def _sdxl_checkpoint(backbone) -> dict:
    """SDXL's original (SGM) layout: LDM UNet (+ label_emb: the added embedding) and VAE, CLIP-L under
    conditioner.embedders.0.transformer., OpenCLIP-G under conditioner.embedders.1.model."""
    from _backbone_util import unet_key_to_ldm, vae_key_to_ldm

    out, c = {}, backbone.components
    for k, v in c["unet"].state_dict().items():
        for hf, ldm in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
            if k.startswith(hf):
                k = ldm + k[len(hf):]
                break
        else:
            k = unet_key_to_ldm(k, c["unet"].config)
        out["model.diffusion_model." + k] = v.clone().contiguous()
    for k, v in c["vae"].state_dict().items():
        ldm = vae_key_to_ldm(k, c["vae"].config)
        out["first_stage_model." + ldm] = v[:, :, None, None] if ".mid.attn_1." in ldm and ldm.endswith(
            "weight") and v.ndim == 2 else v.clone().contiguous()
    for k, v in c["text_encoder"].state_dict().items():
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {**out, **_openclip(c["text_encoder_2"], "conditioner.embedders.1.model.")}


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
def test_single_file_with_model_config_loads_the_same_weights(model, tmp_path, request):
    from safetensors.torch import save_file

    original = request.getfixturevalue(model)
    config = save_backbone(original, tmp_path / "config")
    checkpoint = _sd2_checkpoint(original) if model == "sd2" else _sdxl_checkpoint(original)
    save_file(checkpoint, str(tmp_path / f"{model}.safetensors"))
    loaded = load_backbone(str(tmp_path / f"{model}.safetensors"), model_config=str(config), device="cpu")
    assert loaded.family.name == model and loaded.identity["kind"] == "file"
    assert loaded.identity["weights_sha256"] == original.identity["weights_sha256"]  # every tensor, byte for byte


def test_single_file_of_sdxl_layout_goes_to_the_sdxl_loader(tmp_path):
    """An SGM (SDXL) checkpoint is recognised by its second text encoder's keys; a broken one is named."""
    from safetensors.torch import save_file

    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, str(path))
    from refseg.backbones import loading

    assert loading._checkpoint_family(str(path)).name == "sdxl"
    with pytest.raises(ModelError, match="as a single-file checkpoint"):
        load_backbone(str(path), device="cpu")


# ---- end to end: refseg-extract -> refseg-train-head -> refseg-eval -----------------------------------------

@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl"])
def test_extract_train_eval(model, synth_root, tmp_path):
    from refseg.cache.reader import open_cache

    extract_splits(model, synth_root, tmp_path, 5, L)
    cache = open_cache(tmp_path / "train.zarr")
    family = FAMILIES[model.removeprefix("tiny-")]
    assert cache.spec.names == [f"s{s}" for s in family.default_strides] + ["attn_s16", "attn_s32"]
    pooled = cache.pooled(np.arange(cache.n_samples))
    assert (pooled is None) == (model == "tiny-sd2")  # SDXL stores text/pooled, SD2 as SD1 does not
    if pooled is not None:
        assert pooled.shape == (cache.n_samples, 48) and np.isfinite(pooled).all() and np.abs(pooled).sum() > 0
    noise = cache.noise(5)
    assert noise["kind"] == "ddpm" and noise["model_timestep"] == 5 and noise["snr"] == pytest.approx(
        noise["alpha_bar"] / (1 - noise["alpha_bar"]))
    summary = train_and_evaluate(tmp_path, 5, "film")
    assert summary["n"] == 6 and 0.0 <= summary["mIoU"] <= 100.0


def test_cache_info_prints_the_noise_level(sdxl, synth_root, tmp_path):
    from refseg.cache.cli import main as cache_main
    from refseg.extract.pipeline import ExtractionConfig, run_extraction

    cfg = ExtractionConfig(data_root=str(synth_root), dataset="refcoco-synth", split="val", out=str(tmp_path / "c.zarr"),
                           model="tiny-sdxl", noise_ts=(0, 500), image_size=64, token_length=L, limit=2,
                           progress=False)
    run_extraction(cfg, backbone=sdxl)
    out = CliRunner().invoke(cache_main, ["info", str(tmp_path / "c.zarr")]).output
    assert "T=0     timestep 0     ddpm alpha_bar 1 snr inf (no noise)" in out
    from refseg.core.noise import SD_SCHEDULE, alphas_cumprod

    abar = float(alphas_cumprod(SD_SCHEDULE)[500])
    assert f"T=500   timestep 500   ddpm alpha_bar {abar:.6g} snr {abar / (1 - abar):.6g}" in out
