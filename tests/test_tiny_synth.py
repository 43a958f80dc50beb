"""tiny-synth: the shipped trained backbone, and the training run that rebuilds it."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from refseg.backbones.loading import TINY_SYNTH_DIR, load_backbone
from refseg.backbones.tiny import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG
from refseg.backbones.tiny_synth import checkpoint
from refseg.backbones.tiny_synth.cli import main as cli
from refseg.backbones.tiny_synth.config import TrainConfig
from refseg.backbones.tiny_synth.data import SAMPLE_STREAM, render_scenes, to_model_range
from refseg.backbones.tiny_synth.sample import generate
from refseg.backbones.tiny_synth.train import train


@pytest.fixture
def one_thread():
    """Training at test size is many tiny ops: on a shared 2-core machine two threads spend more time
    waiting for each other than working (7x slower measured). Bytes are per thread count anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth():
    return load_backbone("tiny-synth", device="cpu")


def test_shipped_folder_is_an_fp16_diffusers_folder_under_20mb():
    files = [p for p in TINY_SYNTH_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert json.loads((TINY_SYNTH_DIR / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder"):
        weights = TINY_SYNTH_DIR / part / ("model.safetensors" if part == "text_encoder"
                                           else "diffusion_pytorch_model.safetensors")
        with safe_open(str(weights), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, part
    assert (TINY_SYNTH_DIR / "README.md").read_text().count("python -m refseg.backbones.tiny_synth train") >= 1


def test_loads_offline_through_the_folder_path_with_the_tiny_topology(synth, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert synth.identity["model"] == "tiny-synth" and synth.identity["kind"] == "tiny-synth"
    assert synth.dtype == torch.float32 and not any(p.requires_grad for p in synth.unet.parameters())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "attention_head_dim"):
        assert tuple(np.atleast_1d(synth.unet.config[key])) == tuple(np.atleast_1d(UNET_CONFIG[key])), key
    assert tuple(synth.vae.config.block_out_channels) == VAE_CONFIG["block_out_channels"]
    assert synth.vae.config.latent_channels == 4 and synth.vae_scale_factor == 8
    assert synth.text_encoder.config.hidden_size == TEXT_CONFIG["hidden_size"]
    # the scaling factor was measured on its own latents (1/std), not SD's 0.18215
    assert synth.scaling_factor != VAE_CONFIG["scaling_factor"] and synth.scaling_factor > 0
    # the synthetic words are whole tokens for its text encoder
    assert len(synth.tokenizer("the big red circle", add_special_tokens=False).input_ids) == 4


@torch.inference_mode()
def test_autoencoder_learned_to_reconstruct_synthetic_scenes(synth, tiny_backbone):
    images, _ = render_scenes(seed=123, count=4, image_size=128, stream=SAMPLE_STREAM)
    x = to_model_range(images)

    def l1(bb):
        return (bb.vae.decode(bb.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) - x).abs().mean().item()

    trained, random = l1(synth), l1(tiny_backbone)
    assert trained < 0.15, trained  # [-1, 1] units (measured 0.100 on these scenes)
    assert trained < random / 4, (trained, random)


def test_sampler_gives_images_deterministically_from_a_generator(synth):
    captions = ["a big red circle in the middle", "a small blue square at the top left"]
    a = generate(synth, captions, steps=3, generator=torch.Generator().manual_seed(1))
    b = generate(synth, captions, steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


TINY_RUN = TrainConfig(scenes=6, image_size=64, vae_steps=2, vae_batch=2, vae_crop=32, unet_steps=3, unet_batch=2,
                       warmup_steps=1)


def _run(work, out=None, **kw):
    return train(TINY_RUN, work, out, log=lambda m: None, held_out=2, **kw)


def test_training_is_deterministic_resumable_and_exports_a_loadable_folder(tmp_path, monkeypatch, one_thread):
    straight = _run(tmp_path / "a", tmp_path / "model")
    assert _run(tmp_path / "b")["weights_sha256_fp32"] == straight["weights_sha256_fp32"]

    # interrupted after stage B's first checkpoint (saved every step here), then resumed
    real_save, calls = checkpoint.save, []

    def save_then_die(path, state):
        real_save(path, state)
        calls.append(path.name)
        if path.name == "unet.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "c", checkpoint_seconds=0)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert torch.load(tmp_path / "c" / "unet.pt", weights_only=True)["step"] == 1
    resumed = _run(tmp_path / "c", resume=True)
    assert resumed["weights_sha256_fp32"] == straight["weights_sha256_fp32"]
    assert resumed["unet"]["steps"] == 3 and resumed["vae"]["steps"] == 2

    loaded = load_backbone(str(tmp_path / "model"), device="cpu")
    assert loaded.scaling_factor == pytest.approx(straight["scaling_factor"], rel=1e-6)
    assert json.loads((tmp_path / "model" / "training.json").read_text())["unet"]["steps"] == 3


def test_cli_refuses_to_overwrite_or_resume_with_other_settings(tmp_path, one_thread):
    _run(tmp_path / "w")
    args = ["train", "--work", str(tmp_path / "w"), "--scenes", "6", "--image-size", "64", "--vae-steps", "2",
            "--vae-batch", "2", "--vae-crop", "32", "--unet-steps", "3", "--unet-batch", "2", "--warmup-steps", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "already holds a training run" in result.output
    result = CliRunner().invoke(cli, args[:-1] + ["2", "--resume"])
    assert result.exit_code == 2 and "other settings (warmup_steps)" in result.output
