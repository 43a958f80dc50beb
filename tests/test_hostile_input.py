"""Hostile and broken input at the `refseg-extract` level (issue 7, point 4).

The readers' own tests (test_refer.py, test_transforms.py, test_cache.py) cover each defect in
isolation; here the whole command meets them: one line on stderr and exit 2, nothing executed, no
store (or lock file) left behind for input rejected before extraction starts, and the images and
sentences that are legal but unusual (alpha, grayscale, CMYK, 1x1, huge, 500 words, non-ASCII) are
extracted as their documented conversions say.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr
from _cache_util import store_files
from _cli_util import one_line
from _fault_util import run
from click.testing import CliRunner
from PIL import Image, ImageDraw

from refseg.cache import FORMAT_VERSION, open_cache
from refseg.extract.cli import main
from refseg.extract.pipeline import ExtractionConfig, run_extraction
from refseg.core.errors import DataError

DATASET = "hostile"


def write_dataset(root: Path, images: dict[str, Image.Image | bytes], sentences=None) -> Path:
    """A RefCOCO-format dataset: one image per entry of `images` (file name -> image or raw bytes), one
    square annotation and one ref (split val) per image, with `sentences[i]` (default: one plain one)."""
    folder = Path(root) / DATASET
    (folder / "images").mkdir(parents=True, exist_ok=True)
    instances = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    refs = []
    for i, (name, image) in enumerate(images.items(), start=1):
        if isinstance(image, bytes):
            (folder / "images" / name).write_bytes(image)
            w, h = 32, 32
        else:
            image.save(folder / "images" / name)
            w, h = image.size
        instances["images"].append({"id": i, "file_name": name, "height": h, "width": w})
        box = [w / 4, h / 4, 3 * w / 4, h / 4, 3 * w / 4, 3 * h / 4, w / 4, 3 * h / 4]
        instances["annotations"].append({"id": 100 + i, "image_id": i, "category_id": 1, "iscrowd": 0,
                                         "segmentation": [box]})
        texts = sentences[i - 1] if sentences else ["the square in the middle"]
        sents = [{"sent_id": 10 * i + j, "sent": t, "raw": t, "tokens": t.split()} for j, t in enumerate(texts)]
        refs.append({"ref_id": i, "ann_id": 100 + i, "image_id": i, "category_id": 1, "split": "val",
                     "sent_ids": [s["sent_id"] for s in sents], "sentences": sents, "file_name": "ignored.jpg"})
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return Path(root)


def cli_args(root, out, *extra) -> list[str]:
    return ["--data-root", str(root), "--dataset", DATASET, "--split", "val", "--model", "tiny", "--noise-t", "0",
            "--out", str(out), "--image-size", "64", "--token-length", "16", "--shard-size", "2", "--batch-size", "2",
            "--quiet", *extra]


def config(root, out, **overrides) -> ExtractionConfig:
    kwargs = dict(data_root=str(root), dataset=DATASET, split="val", out=str(out), noise_ts=(0,), image_size=64,
                  token_length=16, shard_size=2, progress=False)
    kwargs.update(overrides)
    return ExtractionConfig(**kwargs)


@pytest.fixture
def cli(monkeypatch, tiny_backbone):
    """`refseg-extract` in-process on the session's tiny backbone -> (exit code, stdout, stderr)."""
    monkeypatch.setattr("refseg.extract.pipeline.load_backbone", lambda *a, **k: tiny_backbone)

    def invoke(args):
        result = CliRunner().invoke(main, args)
        return result.exit_code, result.stdout, result.stderr

    return invoke



def rgb(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---- dataset files: refused before anything is extracted ---------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _break_refs(folder: Path, change) -> None:
    refs = pickle.loads((folder / "refs(unc).p").read_bytes())
    change(refs)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


def _break_polygon(folder: Path, polygon) -> None:
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"][1]["segmentation"] = [polygon]
    (folder / "instances.json").write_text(json.dumps(instances))


BROKEN_FILES = {
    "pickle that runs code": (
        lambda f: (f / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": _RunsCode(f / "pwned")}], protocol=4)),
        "refusing to unpickle"),
    "ref without a field": (lambda f: _break_refs(f, lambda refs: refs[1].pop("ann_id")), "lacks field 'ann_id'"),
    "ref field of the wrong type": (lambda f: _break_refs(f, lambda refs: refs[0].update(image_id="1")),
                                    "field 'image_id' must be an integer"),
    "truncated instances.json": (
        lambda f: (f / "instances.json").write_text((f / "instances.json").read_text()[:150]), "malformed JSON in"),
}


@pytest.mark.parametrize("defect", list(BROKEN_FILES))
def test_broken_dataset_files_exit_2_before_anything_is_written(cli, tmp_path, defect):
    root = write_dataset(tmp_path / "data", {"a.png": rgb(0), "b.png": rgb(1)})
    breaks, needle = BROKEN_FILES[defect]
    breaks(root / DATASET)
    out = tmp_path / "C.zarr"
    code, _, stderr = cli(cli_args(root, out))
    assert code == 2 and needle in one_line(stderr), stderr
    assert not out.exists() and not Path(f"{out}.lock").exists()
    assert not (root / DATASET / "pwned").exists()


@pytest.mark.parametrize("polygon", [[1, 1, 5, 5], [1, 1, 5, 5, 9]], ids=["2 points", "odd coordinate count"])
def test_degenerate_polygon_is_skipped_not_a_refusal_of_the_dataset(cli, tmp_path, polygon):
    """As `refer.getMask` (issue 14): the polygon gives no pixels, the rest of the dataset is extracted."""
    root = write_dataset(tmp_path / "data", {"a.png": rgb(0), "b.png": rgb(1)})
    _break_polygon(root / DATASET, polygon)
    out = tmp_path / "C.zarr"
    with pytest.warns(UserWarning, match="degenerate polygon"):
        code, _, stderr = cli(cli_args(root, out))
    assert code == 0, stderr
    cache = open_cache(out)
    assert cache.done(0).all() and cache.gt([0])[0].any() and not cache.gt([1])[0].any()


def test_polygon_outside_the_image_is_clipped_not_an_error(tiny_backbone, tmp_path):
    root = write_dataset(tmp_path / "data", {"a.png": rgb(0)})
    instances = json.loads((root / DATASET / "instances.json").read_text())
    instances["annotations"][0]["segmentation"] = [[-20, -20, 20, -20, 20, 24, -20, 24]]  # a 40x48 image
    (root / DATASET / "instances.json").write_text(json.dumps(instances))
    run_extraction(config(root, tmp_path / "C.zarr"), backbone=tiny_backbone)
    gt = open_cache(tmp_path / "C.zarr").gt([0])[0]
    # x in [0, 20) of 40 and y in [0, 24) of 48: the top-left quarter at 64 x 64
    expected = np.zeros((64, 64), np.uint8)
    expected[:32, :32] = 1
    np.testing.assert_array_equal(gt, expected)


# ---- images ---------------------------------------------------------------------------------------------
def _jpeg(image: Image.Image) -> Image.Image:
    """`image` as it reads back from a JPEG file (the pixels a JPEG of it decodes to)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_unusual_images_extract_as_their_rgb_conversion(tiny_backbone, tmp_path):
    base = rgb(0)
    with_alpha = base.copy()
    with_alpha.putalpha(Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 40), dtype=np.uint8)))
    gray_jpeg = _jpeg(rgb(1).convert("L"))
    cmyk_jpeg = _jpeg(rgb(2).convert("CMYK"))
    images = {
        "rgb.png": base, "alpha.png": with_alpha,  # alpha is dropped, not composited
        "gray.jpg": rgb(1).convert("L"), "gray-as-rgb.png": gray_jpeg.convert("RGB"),
        "cmyk.jpg": rgb(2).convert("CMYK"), "cmyk-as-rgb.png": cmyk_jpeg.convert("RGB"),
        "one-pixel.png": Image.new("RGB", (1, 1), (200, 30, 90)), "flat.png": Image.new("RGB", (64, 64), (200, 30, 90)),
    }
    root = write_dataset(tmp_path / "data", images)
    for name in ("gray.jpg", "cmyk.jpg"):  # saved as JPEG so that the pair above matches their decoded pixels
        images[name].save(root / DATASET / "images" / name, quality=90)
    assert Image.open(root / DATASET / "images" / "alpha.png").mode == "RGBA"
    assert Image.open(root / DATASET / "images" / "cmyk.jpg").mode == "CMYK"
    run_extraction(config(root, tmp_path / "C.zarr"), backbone=tiny_backbone)
    cache = open_cache(tmp_path / "C.zarr")
    assert cache.done(0).all() and cache.images_done().all()
    latent = dict(zip(images, cache.latents(np.arange(len(images)))))
    assert np.isfinite(np.stack(list(latent.values())).astype(np.float32)).all()
    for a, b in [("alpha.png", "rgb.png"), ("gray.jpg", "gray-as-rgb.png"), ("cmyk.jpg", "cmyk-as-rgb.png"),
                 ("one-pixel.png", "flat.png")]:
        np.testing.assert_array_equal(latent[a], latent[b], err_msg=f"{a} vs {b}")
    assert not np.array_equal(latent["rgb.png"], latent["flat.png"])


def test_truncated_image_names_the_image_then_skip_bad_records_it(cli, tiny_backbone, tmp_path):
    good = io.BytesIO()
    rgb(3).save(good, format="JPEG", quality=90)
    images = {"a.png": rgb(0), "b.png": rgb(1), "c.jpg": good.getvalue()[:400], "d.png": rgb(2)}
    root = write_dataset(tmp_path / "data", images)
    out = tmp_path / "C.zarr"
    code, _, stderr = cli(cli_args(root, out))
    line = one_line(stderr)
    assert code == 2 and "image_id 3" in line and "c.jpg" in line and "--skip-bad" in line
    cache = open_cache(out)  # the shard before it is kept; the shard holding it was not written
    assert cache.images_done().tolist() == [True, True, False, False] and cache.noise_levels == []

    code, stdout, stderr = cli(cli_args(root, out, "--skip-bad"))
    assert code == 0, stderr
    assert "skipped bad samples: 1" in stdout and "sent_id 30: cannot read image" in stdout
    # the bad image and its sample are counted as skipped, not as computed (the first run did images 0-1)
    assert "  vae (images): 1 computed this run\n  vae (images): 1 skipped as bad" in stdout, stdout
    assert "  unet T=0: 3 computed this run\n  unet T=0: 1 skipped as bad (stored as zeros" in stdout, stdout
    cache = open_cache(out)
    assert cache.done(0).tolist() == [True, True, False, True] and cache.skipped(0).tolist() == [False] * 2 + [True, False]
    assert [b["sent_id"] for b in cache.bad] == [30]
    assert not cache.read(0, 2)["s8"].any()  # a skipped sample holds zeros


# ---- sentences ------------------------------------------------------------------------------------------
def test_empty_long_and_non_ascii_sentences(cli, tmp_path):
    long = " ".join(["red"] * 500)
    non_ascii = "café 左 🟥"  # 12 byte-level tokens + start/end: fits in 16
    texts = [["the square"], [""], [long], [non_ascii]]
    root = write_dataset(tmp_path / "data", {f"{i}.png": rgb(i) for i in range(4)}, sentences=texts)
    out = tmp_path / "C.zarr"
    code, _, stderr = cli(cli_args(root, out))
    assert code == 2 and "sent_id 20 (ref 2) has an empty sentence (use --skip-bad to skip it)" in one_line(stderr)

    code, stdout, stderr = cli(cli_args(root, out, "--skip-bad"))
    assert code == 0, stderr
    assert "sentences truncated to the token length: 1" in stdout
    assert "skipped bad samples: 1" in stdout and "sent_id 20: empty sentence" in stdout
    assert "  text encoder (sentences): 3 computed this run\n  text encoder (sentences): 1 skipped as bad" in stdout
    cache = open_cache(out)
    assert cache.texts == ["the square", "", long, non_ascii]  # stored exactly, whatever the script
    assert cache.done(0).tolist() == [True, False, True, True] and cache.skipped(0).tolist() == [False, True, False, False]
    mask = cache.attention_mask([2, 3])
    assert mask[0].tolist() == [1] * 16  # 500 words fill the 16 tokens, the rest is cut (and counted above)
    assert mask[1].sum() == 14  # non-ASCII text is tokenized (byte-level), nothing dropped


# ---- stores ---------------------------------------------------------------------------------------------
def test_store_from_a_newer_refseg_is_refused_untouched(cli, tmp_path):
    root = write_dataset(tmp_path / "data", {"a.png": rgb(0)})
    out = tmp_path / "C.zarr"
    newer = zarr.open_group(str(out), mode="w")
    newer.attrs.put({"refseg_cache": FORMAT_VERSION + 1, "fingerprint": "from-the-future"})
    newer.create_array("features", shape=(4,), dtype="float16")[:] = 1
    before = store_files(out)
    code, _, stderr = cli(cli_args(root, out))
    assert code == 2 and f"written by a newer refseg (format {FORMAT_VERSION + 1}); upgrade refseg" in one_line(stderr)
    assert store_files(out) == before


# ---- a 10,000 x 10,000 photo ---------------------------------------------------------------------------
def test_huge_jpeg_is_extracted_in_bounded_memory(tmp_path):
    """A full decode of this JPEG takes 100 MB (gray) + 300 MB (as RGB); drafted, it decodes at 1/8 scale.

    The GT mask is still rasterised at the original size (the protocol's), ~2 bytes per pixel.
    """
    small = write_dataset(tmp_path / "small", {"a.jpg": rgb(0, (640, 480))})
    huge = Image.new("L", (10_000, 10_000), 90)
    ImageDraw.Draw(huge).rectangle([2500, 2500, 7500, 7500], fill=200)
    big = write_dataset(tmp_path / "big", {"a.jpg": huge})
    del huge
    # the same process extracts the small dataset (everything loaded and warm), then the huge image
    done = run("refseg-extract", cli_args(big, tmp_path / "big.zarr"), logs=tmp_path / "logs",
               warmup=cli_args(small, tmp_path / "small.zarr"))
    assert done.exitcode == 0, done.stderr
    assert done.peak_rss_growth_mb < 380, done.peak_rss_growth_mb
    gt = open_cache(tmp_path / "big.zarr").gt([0])[0]
    assert gt[16:48, 16:48].all() and gt.sum() == 32 * 32


def test_a_blank_sentence_is_an_empty_one_for_the_python_api_too(tiny_backbone, tmp_path):
    root = write_dataset(tmp_path / "data", {"a.png": rgb(0)}, sentences=[["  "]])
    with pytest.raises(DataError, match=r"sent_id 10 \(ref 1\) has an empty sentence"):
        run_extraction(config(root, tmp_path / "C.zarr"), backbone=tiny_backbone)
