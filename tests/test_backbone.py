import json
import socket

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from _backbone_util import to_ldm_state_dict
from refseg.backbones import loading as backbone_mod
from refseg.backbones.loading import load_backbone, resolve_dtype, save_backbone, weights_sha256
from refseg.core.errors import ModelError
from refseg.core.synthetic import VOCABULARY
from refseg.backbones.tiny import build_tiny
from refseg.backbones.tokenizer_vocab import build_tokenizer, build_vocab

FORMS = ("Hugging Face hub id", "local diffusers folder", ".safetensors/.ckpt", "--model-config", "'tiny'")


def _state_bytes(module):
    return {k: v.contiguous().view(torch.uint8).clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a, b):
    for part in ("vae", "unet", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k}"


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_backbone(build_tiny(), tmp_path_factory.mktemp("backbone") / "tiny-diffusers")


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and any network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# ---- the tiny model -------------------------------------------------------------------------------
def test_build_tiny_is_deterministic():
    a, b, c = build_tiny(0), build_tiny(0), build_tiny(1)
    for part in ("vae", "unet", "text_encoder"):
        ba, bb = _state_bytes(a[part]), _state_bytes(b[part])
        assert all(torch.equal(ba[k], bb[k]) for k in ba), part
    assert weights_sha256({k: a[k] for k in ("vae", "unet")}) == weights_sha256({k: b[k] for k in ("vae", "unet")})
    assert weights_sha256({"unet": a["unet"]}) != weights_sha256({"unet": c["unet"]})


def test_tiny_has_sd_topology(tiny):
    unet = tiny.unet.config
    assert len(unet.block_out_channels) == 4 and unet.layers_per_block == 2
    assert unet.cross_attention_dim == tiny.text_encoder.config.hidden_size
    assert tiny.vae_scale_factor == 8 and tiny.vae.config.latent_channels == 4
    assert tiny.scaling_factor == pytest.approx(0.18215)
    assert tiny.max_token_length >= 77
    assert (tiny.scheduler_config["beta_schedule"], tiny.scheduler_config["beta_start"],
            tiny.scheduler_config["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    spec = tiny.spec(128, 40)
    assert [(t.name, t.channels, t.size) for t in spec.features] == [
        ("s64", 64, 2), ("s32", 64, 4), ("s16", 64, 8), ("s8", 32, 16)]
    assert [(t.name, len(t.modules)) for t in spec.attention] == [("attn_s32", 5), ("attn_s16", 5)]


def test_backbone_is_frozen_fp32_on_cpu(tiny):
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    for part in (tiny.vae, tiny.unet, tiny.text_encoder):
        assert not part.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in part.parameters())
    assert tiny.identity["kind"] == "tiny" and len(tiny.identity["weights_sha256"]) == 64
    json.dumps(tiny.identity)  # goes into the cache's JSON attributes


def test_tokenizer_whole_words_bytes_and_truncation(tiny):
    tok = tiny.tokenizer
    ids = tok("the big red circle left of the blue square").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "the</w>", "big</w>", "red</w>", "circle</w>",
                                               "left</w>", "of</w>", "the</w>", "blue</w>", "square</w>",
                                               "<|endoftext|>"]
    for word in VOCABULARY:
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [word + "</w>"]
    text = "Ünïcödé 東京 🙂 naïve triangles"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    long = " ".join(["circle"] * 500)
    enc = tok([long, "red"], truncation=True, max_length=40, padding="max_length", return_tensors="pt")
    assert enc.input_ids.shape == (2, 40)
    assert enc.input_ids[0, -1].item() == tok.eos_token_id and enc.attention_mask[0].sum().item() == 40
    assert enc.attention_mask[1].tolist() == [1, 1, 1] + [0] * 37
    emb = tiny.text_encoder(enc.input_ids)[0]
    assert emb.shape == (2, 40, 32) and torch.isfinite(emb).all()


def test_bpe_merges_keep_every_listed_word_whole():
    words = ["circle", "close", "cl", "le", "rc", "ircle", "naïve", "a"]
    tok = build_tokenizer(words)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.decode(ids) == w
    assert build_vocab(words) == build_vocab(list(reversed(words)))  # independent of the word order


def test_token_length_beyond_the_text_encoder_is_refused(tiny):
    with pytest.raises(ModelError, match="--token-length 78 exceeds"):
        tiny.spec(128, 78)


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown --dtype"):
        resolve_dtype("int8", cpu)
    bf16 = load_backbone("tiny", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.unet.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_backbone("tiny", device="cuda")


# ---- loading paths (offline) ----------------------------------------------------------------------
def test_folder_round_trip(tiny, tiny_folder, offline):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_folder / sub).is_dir()
    # CLIP's own two files, as transformers 4.x's CLIPTokenizer reads them, give the same tokens.
    files = CLIPTokenizer(str(tiny_folder / "tokenizer" / "vocab.json"), str(tiny_folder / "tokenizer" / "merges.txt"))
    assert files("the big red circle left of the blue square").input_ids == \
        tiny.tokenizer("the big red circle left of the blue square").input_ids
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = load_backbone(str(tiny_folder))
    _assert_same_weights(tiny, loaded)
    assert loaded.identity["kind"] == "folder" and loaded.identity["model"] == str(tiny_folder.resolve())
    assert loaded.identity["weights_sha256"] == tiny.identity["weights_sha256"]
    assert loaded.identity["tokenizer_sha256"] == tiny.identity["tokenizer_sha256"]
    text = "the small green star above the purple diamond"
    assert loaded.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    assert offline == []


def test_save_a_loaded_backbone_again(tiny, tmp_path, offline):
    again = load_backbone(str(save_backbone(tiny, tmp_path / "again")))
    _assert_same_weights(tiny, again)
    assert again.scheduler_config["beta_end"] == 0.012


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_single_file_in_ldm_layout(tiny, tiny_folder, tmp_path, offline, ext):
    ldm = to_ldm_state_dict(tiny.unet, tiny.vae, tiny.text_encoder)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # SD's original key layout
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    path = tmp_path / f"tiny.{ext}"
    if ext == "safetensors":
        save_file(ldm, str(path))
    else:
        torch.save({"state_dict": ldm}, path)
    loaded = load_backbone(str(path), model_config=str(tiny_folder))
    _assert_same_weights(tiny, loaded)
    assert loaded.identity["kind"] == "file" and loaded.identity["weights_sha256"] == tiny.identity["weights_sha256"]
    assert loaded.tokenizer("red circle").input_ids == tiny.tokenizer("red circle").input_ids
    assert offline == []


def _one_line_model_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_model_lists_the_accepted_forms(offline):
    with pytest.raises(ModelError) as e:
        load_backbone("no-such-model")
    msg = _one_line_model_error(e)
    assert msg.startswith("cannot load model 'no-such-model': not found.")
    assert all(form in msg for form in FORMS)


def test_hub_id_offline_is_a_model_error_without_network(offline):
    with pytest.raises(ModelError) as e:
        load_backbone("refseg-test-owner/no-such-model")
    msg = _one_line_model_error(e)
    assert "not found" in msg and "HF_HUB_OFFLINE" in msg and all(form in msg for form in FORMS)
    assert offline == []


def test_bad_files_and_folders(tmp_path, offline):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a valid .safetensors file") as e:
        load_backbone(str(bad))
    _one_line_model_error(e)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch .ckpt file"):
        load_backbone(str(tmp_path / "bad.ckpt"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="must end in .safetensors or .ckpt"):
        load_backbone(str(tmp_path / "weights.bin"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ModelError, match=r"not a diffusers folder \(missing vae/, text_encoder/, tokenizer/, scheduler/\)"):
        load_backbone(str(tmp_path / "half"))
    with pytest.raises(ModelError, match="must be a local diffusers folder with model_index.json"):
        load_backbone(str(bad), model_config=str(tmp_path))


def test_single_file_offline_without_model_config_is_a_model_error(tiny, tmp_path, offline):
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm_state_dict(tiny.unet, tiny.vae, tiny.text_encoder), str(path))
    with pytest.raises(ModelError, match="--model-config") as e:
        load_backbone(str(path))
    _one_line_model_error(e)
    assert offline == []


def test_tiny_synth_resolves_to_the_packaged_folder(tiny, tiny_folder, tmp_path, monkeypatch, offline):
    monkeypatch.setattr(backbone_mod, "TINY_SYNTH_DIR", tmp_path / "absent")
    with pytest.raises(ModelError, match="'tiny-synth': it is not built"):
        load_backbone("tiny-synth")
    monkeypatch.setattr(backbone_mod, "TINY_SYNTH_DIR", tiny_folder)
    synth = load_backbone("tiny-synth")
    # kind 'tiny-synth' (was 'folder'); fingerprints hash it as 'folder' still (test_guard_extract.py)
    assert synth.identity["model"] == "tiny-synth" and synth.identity["kind"] == "tiny-synth"
    _assert_same_weights(tiny, synth)
