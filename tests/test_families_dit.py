"""Joint-attention transformer families behind the family seam: SD3 (MMDiT) and FLUX at toy size.

For each: registry and topology, text conditioning and the transformer call exactly as diffusers'
own pipeline makes them, the folder round trip, and refseg-extract -> refseg-train-head -> refseg-eval
on the tiny model (capture exactness: tests/test_joint_capture.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _families_util import extract_splits, train_and_evaluate
from refseg.backbones.families import FAMILIES, TextConditioning, family_for_index, tiny_names
from refseg.backbones.loading import load_backbone, save_backbone
from refseg.core.errors import ModelError

L = 8
PROMPTS = ["the red circle left of the square", "a big blue star"]
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny(request):
    return load_backbone(f"tiny-{request.param}", device="cpu")


def pipeline_of(backbone):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {k: v for k, v in backbone.components.items() if k != "scheduler_config"}
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(backbone.components["scheduler_config"])
    return getattr(diffusers, PIPELINES[backbone.family.name])(**parts)


def test_registry_and_detection():
    names = tiny_names()
    assert names["tiny-sd3"] is FAMILIES["sd3"] and names["tiny-flux"] is FAMILIES["flux"]
    assert family_for_index({"_class_name": "StableDiffusion3Pipeline"}).name == "sd3"
    assert family_for_index({"_class_name": "FluxPipeline"}).name == "flux"


def test_topology_spec_and_identity(tiny):
    family, parts = tiny.family, tiny.components
    assert tiny.identity["family"] == family.name and family.noise_kind == "flow"
    assert tiny.latent_channels == 16 and tiny.shift_factor is not None and tiny.max_stride == 16
    assert tiny.default_image_size == 1024
    transformer = parts["transformer"]
    spec = tiny.spec(64, L)
    assert {t.stride for t in spec.tensors} == {16} and spec.latent_channels == 16
    if family.name == "sd3":
        blocks = transformer.transformer_blocks
        assert blocks[0].attn2 is not None and blocks[1].attn2 is None  # SD3.5's dual-attention block first
        assert blocks[-1].context_pre_only and type(blocks[0].attn.norm_q).__name__ == "RMSNorm"
        assert spec.names == ["j01_s16", "j02_s16", "j03_s16", "attn_j01_s16", "attn_j02_s16", "attn_j03_s16"]
        assert spec.token_length == 77 + L  # CLIP's 77 positions, then T5's L
        assert tiny.scaling_factor == 1.5305 and tiny.shift_factor == 0.0609
    else:
        assert transformer.config.guidance_embeds and tiny.identity["guidance"] == 3.5
        assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 4
        assert spec.names == ["d01_s16", "x01_s16", "x02_s16", "attn_d01_s16", "attn_x01_s16", "attn_x02_s16"]
        assert spec["x02_s16"].modules == ("single_transformer_blocks.2",) and spec.token_length == L
    assert tiny.spec(64, L, strides=(16,), attn_strides=()).names == spec.names[:3]  # maps off
    with pytest.raises(ModelError, match="every feature of a .* transformer is at stride 16"):
        tiny.spec(64, L, strides=(8,))
    with pytest.raises(ModelError, match="no block z09"):
        tiny.spec(64, L, blocks=("z09",))


def test_text_conditioning_as_the_diffusers_pipeline_builds_it(tiny):
    pipe = pipeline_of(tiny)
    with torch.inference_mode():
        ours = tiny.encode(tiny.tokenize(PROMPTS, L))
        if tiny.family.name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=L)
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=L)
    assert torch.equal(ours.embedding, embeds) and torch.equal(ours.pooled, pooled)
    ids = tiny.tokenize(PROMPTS, L)["input_ids"]
    assert ids.shape == (2, tiny.spec(64, L).token_length)  # the ids index the maps' token axis


def test_transformer_call_as_the_diffusers_pipeline_makes_it(tiny):
    """One pipeline step, recorded at the transformer: our forward on the same latents, text and σ gives
    the same velocity, and `noise_input(sigma=σ)` gives the timestep the pipeline passed."""
    family, transformer = tiny.family, tiny.components["transformer"]
    calls = []

    def record(module, args, kwargs, output):
        calls.append((dict(kwargs), output[0].clone()))

    handle = transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe = pipeline_of(tiny)
        with torch.inference_mode():
            no_cfg = {"guidance_scale": 1.0} if family.name == "sd3" else {}  # one conditional pass per step
            pipe(PROMPTS[0], height=64, width=64, num_inference_steps=2, output_type="latent", max_sequence_length=L,
                 generator=torch.Generator().manual_seed(0), **no_cfg)
    finally:
        handle.remove()
    kwargs, velocity = calls[-1]  # the second step: σ < 1
    timestep = float(kwargs["timestep"][0])
    sigma = timestep / family.flow_timestep_scale
    noise = tiny.noise_input(sigma=sigma)
    assert noise.model_timestep == pytest.approx(timestep, rel=1e-6)
    text = TextConditioning(kwargs["encoder_hidden_states"], kwargs["pooled_projections"])
    latents = kwargs["hidden_states"]
    if family.name == "flux":
        from refseg.backbones.families.flux import pack_latents, unpack_latents

        assert float(kwargs["guidance"][0]) == 3.5
        latents = unpack_latents(latents, (1, 16, 8, 8))
    with torch.inference_mode():
        ours = family.forward(tiny.components, latents, noise, text)
    if family.name == "flux":
        ours = pack_latents(ours)
    torch.testing.assert_close(ours, velocity, rtol=0, atol=1e-6)


def test_folder_round_trip(tiny, tmp_path):
    import diffusers

    folder = save_backbone(tiny, tmp_path / tiny.family.name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == PIPELINES[tiny.family.name]
    loaded = load_backbone(str(folder), device="cpu")
    assert loaded.family is tiny.family
    assert {k: v for k, v in loaded.identity.items() if k not in ("model", "kind")} == \
        {k: v for k, v in tiny.identity.items() if k not in ("model", "kind")}
    with torch.inference_mode():
        ours, theirs = (b.encode(b.tokenize(PROMPTS, L)) for b in (loaded, tiny))
    assert torch.equal(ours.embedding, theirs.embedding) and torch.equal(ours.pooled, theirs.pooled)
    pipe = getattr(diffusers, PIPELINES[tiny.family.name]).from_pretrained(str(folder), local_files_only=True)
    assert type(pipe.transformer).__name__ == type(tiny.components["transformer"]).__name__


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_extract_train_eval(model, synth_root, tmp_path):
    from refseg.cache.reader import open_cache
    from refseg.core.noise import sd_snr

    extract_splits(model, synth_root, tmp_path, 500, L)
    cache = open_cache(tmp_path / "train.zarr")
    family = FAMILIES[model.removeprefix("tiny-")]
    assert {t.stride for t in cache.spec.tensors} == {16} and len(cache.spec.attention) == 3
    pooled = cache.pooled(np.arange(cache.n_samples))
    assert pooled.shape == (cache.n_samples, 40 if model == "tiny-sd3" else 32) and np.abs(pooled).sum() > 0
    noise = cache.noise(500)
    assert noise["kind"] == "flow" and noise["snr"] == pytest.approx(sd_snr(500), rel=1e-9)  # SD's SNR at T = 500
    assert noise["model_timestep"] == pytest.approx(noise["sigma"] * family.flow_timestep_scale)
    summary = train_and_evaluate(tmp_path, 500, "pyramid")
    assert summary["n"] == 6 and 0.0 <= summary["mIoU"] <= 100.0


def test_single_file_with_model_config_goes_to_the_family_loader(tiny, tmp_path):
    """--model-config of an SD3/FLUX folder routes a checkpoint to its pipeline's from_single_file; a file
    diffusers cannot convert is one ModelError naming it (real checkpoints are GB-sized: not tested here)."""
    from safetensors.torch import save_file

    folder = save_backbone(tiny, tmp_path / "config")
    path = tmp_path / "model.safetensors"
    save_file({"not.a.known.key": torch.ones(4)}, str(path))
    with pytest.raises(ModelError, match=f"as a single-file {tiny.family.name} checkpoint"):
        load_backbone(str(path), model_config=str(folder), device="cpu")


def test_transformer_spec_of_the_full_size_configs():
    """FeatureSpec.from_transformer on FLUX.1-dev's and SD3-medium's configs: default blocks, names, bytes."""
    from bench.families import FLUX_DEV_CONFIG, SD3_MEDIUM_CONFIG
    from refseg.core.feature_spec import FeatureSpec

    flux = FeatureSpec.from_transformer(FLUX_DEV_CONFIG, 1024, 512)
    assert flux.names == ["d14_s16", "x09_s16", "x23_s16", "attn_d14_s16", "attn_x09_s16", "attn_x23_s16"]
    assert flux["x23_s16"].modules == ("single_transformer_blocks.23",)
    assert flux["attn_d14_s16"].modules == ("transformer_blocks.14.attn",)
    assert flux["d14_s16"].shape == (3072, 64, 64) and flux["attn_x09_s16"].shape == (512, 64, 64)
    assert flux.latent_channels == 16 and flux.text_dim == 4096
    assert flux.bytes_per_sample() == 3 * 3072 * 64 * 64 * 2 + 3 * 512 * 64 * 64 * 2
    assert FeatureSpec.from_dict(flux.to_dict()) == flux
    sd3 = FeatureSpec.from_transformer(SD3_MEDIUM_CONFIG, 1024, 77 + 40, blocks=("j00", "j23"), attn_blocks=())
    assert sd3.names == ["j00_s16", "j23_s16"] and sd3["j23_s16"].shape == (1536, 64, 64)
    with pytest.raises(ValueError, match="no block x00 in this transformer \\(blocks: j00..j23\\)"):
        FeatureSpec.from_transformer(SD3_MEDIUM_CONFIG, 1024, 117, blocks=("x00",))
    with pytest.raises(ValueError, match="not a multiple of the transformer's stride 16"):
        FeatureSpec.from_transformer(SD3_MEDIUM_CONFIG, 1000, 117)


def test_t5_tokenizer_built_in_code_round_trips(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    from refseg.backbones.t5_tokenizer import build_t5_tokenizer

    tok = build_t5_tokenizer()
    texts = ["The red circle, left of the square", "zebra ÿ 42"]
    ids = tok(texts, padding="max_length", max_length=12, truncation=True)["input_ids"]
    # the synthetic world's words are one piece each; anything else falls back to characters (T5 is
    # case-sensitive: "The" is not "the"); `</s>` ends every sequence, `<pad>` (id 0) pads it
    assert tok.convert_ids_to_tokens(ids[0]) == ["▁T", "h", "e", "▁red", "▁circle", ",", "▁left", "▁of", "▁the",
                                                 "▁square", "</s>", "<pad>"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.convert_ids_to_tokens(ids[1])[5:7] == ["▁", "<unk>"]  # a character outside the vocabulary
    tok.save_pretrained(tmp_path / "t5")
    for cls in (T5TokenizerFast, AutoTokenizer):
        again = cls.from_pretrained(tmp_path / "t5")
        assert again(texts, padding="max_length", max_length=12, truncation=True)["input_ids"] == ids


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_tiny_weights_are_deterministic_from_the_seed(name):
    family = FAMILIES[name]
    a, b, c = family.build_tiny(0), family.build_tiny(0), family.build_tiny(1)
    for part in ("transformer", "vae", *family.text_encoders):
        sa, sb = a[part].state_dict(), b[part].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a["transformer"].proj_out.weight, c["transformer"].proj_out.weight)


def test_extract_refuses_a_stride_a_transformer_does_not_have(synth_root, tmp_path):
    from refseg.extract.cli import main as extract_main

    result = CliRunner().invoke(extract_main, [
        "--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", "val", "--model", "tiny-flux",
        "--image-size", "64", "--token-length", str(L), "--noise-t", "5", "--strides", "8,16",
        "--out", str(tmp_path / "c.zarr"), "--quiet", "--threads", "1"])
    assert result.exit_code == 2
    assert "--strides 8,16: every feature of a flux transformer is at stride 16" in result.output
    assert not (tmp_path / "c.zarr").exists()


def test_blocks_choose_what_is_stored_and_are_refused_where_they_do_not_exist(synth_root, tmp_path):
    from refseg.cache.reader import open_cache
    from refseg.extract.cli import main as extract_main

    def extract(model, out, *extra):
        return CliRunner().invoke(extract_main, [
            "--data-root", str(synth_root), "--dataset", "refcoco-synth", "--split", "val", "--model", model,
            "--image-size", "64", "--token-length", str(L), "--noise-t", "5", "--limit", "2",
            "--out", str(tmp_path / out), "--quiet", "--threads", "1", *extra])

    result = extract("tiny-flux", "chosen.zarr", "--blocks", "d00,x03", "--attn-blocks", "x03")
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "chosen.zarr")
    assert cache.spec.names == ["d00_s16", "x03_s16", "attn_x03_s16"]
    assert cache.extraction_record["extraction"]["blocks"] == ["d00", "x03"]
    assert cache.extraction_record["extraction"]["attn_blocks"] == ["x03"]
    assert cache.read(5, 0)["d00_s16"].shape == cache.spec["d00_s16"].shape
    result = extract("tiny-flux", "same.zarr", "--blocks", "x01")  # maps follow --blocks
    assert result.exit_code == 0 and open_cache(tmp_path / "same.zarr").spec.names == ["x01_s16", "attn_x01_s16"]
    for model, flag, fragment in (("tiny-flux", "x09", "no block x09 in this transformer"),
                                  ("tiny", "d00", "family sd takes strides and attn_strides, not attn_blocks, blocks")):
        result = extract(model, "bad.zarr", "--blocks", flag)
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bad.zarr").exists()
