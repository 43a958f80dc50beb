"""Hostile inputs (issue 23, second pass): model folders whose configs and weights disagree, wide and
odd images, names in messages, and refseg-predict's files. Each test fails on the code before it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from _cli_util import refused_model_copy


# ---- model folders: a config and weights of different models are refused, never run half-random ----
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from refseg.backbones.loading import save_backbone
    from refseg.backbones.tiny import build_tiny

    return save_backbone(build_tiny(), tmp_path_factory.mktemp("model") / "tiny")


def drop_weight(sub: str, file: str, name_part: str):
    """Remove the first tensor whose name contains `name_part` from `sub/file`."""
    def edit(folder):
        tensors = load_file(folder / sub / file)
        del tensors[next(k for k in sorted(tensors) if name_part in k)]
        save_file(tensors, folder / sub / file)
    return edit


def set_config(sub: str, file: str = "config.json", **values):
    def edit(folder):
        path = folder / sub / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return edit


def write(sub: str, file: str, text: str):
    return lambda folder: (folder / sub / file).write_text(text)


BROKEN = {
    # weights the config describes but the files lack: diffusers left them uninitialised, transformers random
    "unet-weight-missing": (drop_weight("unet", "diffusion_pytorch_model.safetensors", "conv_in.bias"),
                            "its unet/ cannot be loaded: its weights lack 1 tensor(s) that its config.json describes "
                            "(conv_in.bias)"),
    "vae-weight-missing": (drop_weight("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_in.bias"),
                           "its vae/ cannot be loaded: its weights lack 1 tensor(s) that its config.json describes "
                           "(decoder.conv_in.bias)"),
    "text-more-layers": (set_config("text_encoder", num_hidden_layers=5),
                         "its text_encoder/ cannot be loaded: its weights lack 48 tensor(s) that its config.json "
                         "describes (encoder.layers.2."),
    # other shapes: the first weight named with both shapes (transformers said "look at the above report!")
    "text-other-shapes": (set_config("text_encoder", intermediate_size=100),
                          "its text_encoder/ cannot be loaded: its weights do not fit its config.json: "
                          "encoder.layers.0.mlp.fc1.bias is [64] in the weights but the config makes it "
                          "[100] (6 tensors differ)"),
    "unet-other-shapes": (set_config("unet", layers_per_block=3),
                          "its unet/ cannot be loaded: its weights do not fit its config.json: up_blocks.2.resnets.2."
                          "norm1.weight is [96] in the weights but the config makes it [128] (4 tensors differ)"),
    # a JSON value that is not a config (diffusers read the list as a hub id to download)
    "unet-config-list": (write("unet", "config.json", "[1, 2]"),
                         "its unet/ cannot be loaded: unet/config.json holds a JSON list, not the object of settings"),
    "text-config-list": (write("text_encoder", "config.json", "[]"),
                         "its text_encoder/ cannot be loaded: text_encoder/config.json holds a JSON list"),
    "vae-config-empty": (write("vae", "config.json", ""),
                         "its vae/ cannot be loaded: vae/config.json is not a valid JSON file (Expecting value"),
    # the scheduler's settings of the wrong type (a traceback when the first noise level was set)
    "scheduler-wrong-type": (set_config("scheduler", "scheduler_config.json", num_train_timesteps="many"),
                             "its scheduler/ cannot be loaded: its scheduler_config.json holds a value of the wrong "
                             "type (invalid literal for int()"),
    # an unreadable model_index.json: the family is unknown (it was taken as SD1.x)
    "index-invalid": (lambda folder: (folder / "model_index.json").write_text("{oops"),
                      "its model_index.json is not a JSON object naming the pipeline"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_model_folder_whose_config_and_weights_disagree_is_refused(model_folder, tmp_path, case):
    refused_model_copy(model_folder, tmp_path, case, *BROKEN[case])


def test_a_missing_weights_file_prints_nothing_beside_the_error(model_folder, tmp_path):
    """diffusers logged "An error occurred while trying to fetch ..." above the one-line error (a process of
    its own: diffusers' log handler writes to the stderr of the moment it was imported)."""
    broken = tmp_path / "no-weights"
    shutil.copytree(model_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    script = ("import sys\nfrom refseg.backbones.loading import load_backbone\nfrom refseg.core.errors import ModelError\n"
              "try:\n    load_backbone(sys.argv[1])\nexcept ModelError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(broken)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "its unet/ cannot be loaded: Error no file named diffusion_pytorch_model" in done.stdout, done
    assert done.stderr == "", done.stderr


def test_the_untouched_folder_still_loads_to_the_same_weights(model_folder):
    from refseg.backbones.loading import load_backbone

    a, b = load_backbone("tiny"), load_backbone(str(model_folder))
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"]


# ---- images wider than 8 bits: scaled by their real range, in every format Pillow opens them from ----
ONE_LEVEL = 1 / 127.5 + 1e-6  # one 8-bit step in image_to_tensor's [-1, 1]


def gradient16(h=24, w=32, top=65535) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x / (w - 1) * 0.7 + y / (h - 1) * 0.3) * top).astype(np.uint16)


def write_png16(path, array: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot save 16-bit RGB/RGBA/LA): grey 0, RGB 2, LA 4, RGBA 6."""
    import struct
    import zlib

    h, w = array.shape[:2]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


def write_pgm16(path, array: np.ndarray, maxval: int = 65535) -> None:
    """A 16-bit binary PGM (P5) or PPM (P6): Pillow opens the grey one as mode I."""
    magic = b"P5" if array.ndim == 2 else b"P6"
    path.write_bytes(magic + f"\n{array.shape[1]} {array.shape[0]}\n{maxval}\n".encode() + array.astype(">u2").tobytes())


def eight_bit_input(array16: np.ndarray) -> torch.Tensor:
    from refseg.core.transforms import image_to_tensor

    eight = np.rint(array16 / 257).astype(np.uint8)
    return image_to_tensor(Image.fromarray(eight if eight.ndim == 3 else np.stack([eight] * 3, -1)), 16)


@pytest.mark.parametrize("kind", ["pgm", "pgm-dark", "ppm", "png-rgb", "png-rgba", "png-la", "png-grey-dark"])
def test_a_16_bit_file_gives_its_8_bit_versions_input(tmp_path, kind):
    """A dark 16-bit PGM (every value <= 255, opened as mode I) was read as 8-bit: up to 257 times too bright."""
    from refseg.core.transforms import image_to_tensor, load_image

    top = 250 if kind.endswith("dark") else 65535
    grey = gradient16(top=top)
    colour = kind in ("ppm", "png-rgb", "png-rgba")
    rgb = np.stack([grey, 65535 - grey, grey // 2], -1) if colour else np.stack([grey] * 3, -1)
    path = tmp_path / f"x.{kind.split('-')[0]}"
    if kind.startswith("pgm"):
        write_pgm16(path, grey)
    elif kind == "ppm":
        write_pgm16(path, rgb)
    elif kind == "png-rgb":
        write_png16(path, rgb, 2)
    elif kind == "png-rgba":
        write_png16(path, np.concatenate([rgb, np.full(grey.shape + (1,), 65535, np.uint16)], -1), 6)
    elif kind == "png-la":
        write_png16(path, np.stack([grey, np.full_like(grey, 65535)], -1), 4)
    else:
        write_png16(path, grey, 0)
    x = image_to_tensor(load_image(path), 16)
    assert torch.abs(x - eight_bit_input(rgb)).max() <= ONE_LEVEL, kind


def test_float_images_with_nan_or_inf_and_premultiplied_modes_convert(recwarn):
    from refseg.core.transforms import to_rgb8

    values = np.array([[np.nan, 0.5, np.inf, -np.inf, -0.2, 1.0]], np.float32)
    assert np.asarray(to_rgb8(Image.fromarray(values)))[0, :, 0].tolist() == [0, 128, 255, 0, 0, 255]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # "invalid value encountered in cast"
    la = Image.new("LA", (3, 2), (90, 255)).convert("La")
    assert np.asarray(to_rgb8(la)).tolist() == [[[90] * 3] * 3] * 2


def test_a_large_16_bit_picture_converts_without_full_size_float_copies():
    """to_rgb8 widened the whole picture to float64 (8 bytes a pixel, several copies): a 16-bit 10000²
    PNG took 3 GB in refseg-predict. Strip by strip, the numpy memory is a few bytes a pixel."""
    import tracemalloc

    from refseg.core.transforms import to_rgb8

    image = Image.fromarray(np.full((4000, 4000), 40000, np.uint16))
    tracemalloc.start()
    try:
        rgb = to_rgb8(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(rgb)[0, 0].tolist() == [156, 156, 156]  # 40000 / 257 = 155.6
    assert peak < 5 * 4000 * 4000, peak  # the uint16 array (2 B), the 8-bit result (1 B), one strip


# ---- incompatibility messages name a tiny-synth recorded as kind 'folder' by today's name ----------
def test_a_tiny_synth_recorded_as_folder_is_named_tiny_synth():
    from refseg.cache.fingerprint import mismatch_message
    from refseg.core.errors import CacheMismatchError
    from refseg.heads.caches import check_compatible

    old = {"model": "tiny-synth", "kind": "folder", "weights_sha256": "a"}  # a store made before the rename
    tiny = {"model": "tiny", "kind": "tiny", "weights_sha256": "b"}
    line = mismatch_message("C.zarr", {"backbone": old}, {"backbone": tiny})
    assert "backbone.kind is 'tiny-synth' in the store but 'tiny' now" in line and "folder" not in line, line
    with pytest.raises(CacheMismatchError) as err:
        check_compatible({"backbone": tiny, "extraction": {}}, {"backbone": old, "extraction": {}}, "run R", "C")
    assert "backbone.kind is 'tiny-synth' in the cache but 'tiny' in the run" in str(err.value), str(err.value)
    assert "folder" not in str(err.value)
    # a user's own folder keeps its kind: only the shipped model's former name is translated
    folder = {"model": "/models/mine", "kind": "folder", "weights_sha256": "c"}
    assert "backbone.kind is 'folder' in the store" in mismatch_message("C", {"backbone": folder}, {"backbone": tiny})


# ---- PNGs (refseg-predict, refseg-eval --overlays) are written whole or not at all ------------------
@pytest.mark.parametrize("failure", ["enospc", "interrupt", "encoder"])
def test_a_png_write_that_fails_leaves_no_part_and_the_previous_file_whole(tmp_path, monkeypatch, failure):
    """The temporary file was removed only on an OSError: Ctrl-C or an encoder error left `.NAME.tmp`."""
    import errno

    from refseg.core.errors import RefsegError
    from refseg.heads.overlays import save_png

    target = tmp_path / "000_overlay.png"
    save_png(Image.new("RGB", (4, 4), (1, 2, 3)), target)
    before = target.read_bytes()
    real_save = Image.Image.save

    def half_then_fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")  # some bytes reached the disk
        raise {"enospc": OSError(errno.ENOSPC, "No space left on device"), "interrupt": KeyboardInterrupt(),
               "encoder": ValueError("encoder error -2")}[failure]

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    expected = {"enospc": RefsegError, "interrupt": KeyboardInterrupt, "encoder": ValueError}[failure]
    with pytest.raises(expected) as err:
        save_png(Image.new("RGB", (4, 4)), target)
    if failure == "enospc":
        assert str(err.value) == (f"writing {target} failed: No space left on device (ENOSPC); no part of it is left: "
                                  "free space or choose another output, then run the command again")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_overlay.png"]
    assert target.read_bytes() == before
