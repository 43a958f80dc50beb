"""The study's figures and overlays: readable colours on any object, a colour key, wrapped captions,
the best/worst/given samples chosen, integer-epoch curves, attention over the image, mean ± std tables."""

import csv
import json

import numpy as np
import pytest
from _heads_util import make_cache
from PIL import Image

from refseg.cache import open_cache
from refseg.heads.overlays import (GT_COLOUR, HALO_COLOUR, PRED_COLOUR, OverlayPicker, font, legend,
                                   overlay_image, wrap)
from refseg.study import figures

RED, BLUE = (215, 40, 40), (40, 80, 215)  # the synthetic world's red and blue (refseg.core.synthetic.RGB)


def _two_objects(size=96):
    """A red left half and a blue right half; GT and prediction each straddle both colours."""
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[:, : size // 2], rgb[:, size // 2:] = RED, BLUE
    gt = np.zeros((size, size), bool)
    gt[20:70, 10:80] = True
    pred = np.zeros((size, size), bool)
    pred[30:90, 30:90] = True
    return Image.fromarray(rgb), pred, gt


def _is(pixels, colour):
    return np.all(pixels == np.array(colour), axis=-1)


def test_overlay_colours_stay_visible_on_red_and_blue_with_a_key():
    image, pred, gt = _two_objects()
    out = np.asarray(overlay_image(image, pred, gt, "the big red circle"))
    key_h = legend(image.width).height
    body = out[key_h:key_h + 96]
    for side in (slice(0, 48), slice(48, 96)):  # on the red and on the blue object alike
        part = body[:, side]
        assert _is(part, GT_COLOUR).sum() > 20  # the GT outline, white...
        assert _is(part, HALO_COLOUR).sum() > 20  # ...on a black halo
        assert _is(part, PRED_COLOUR).sum() > 40  # the prediction's cyan hatch and outline
    # the GT outline runs along the mask's border, not inside it
    assert _is(body[20, 10:80], GT_COLOUR).all() and not _is(body[45, 40:60], GT_COLOUR).any()
    # the hatch leaves most of the predicted object's own colour visible
    inside = body[40:60, 60:80]
    assert 0.15 < _is(inside, PRED_COLOUR).mean() < 0.6 and _is(inside, BLUE).mean() > 0.3
    # a colour key above the image holds both symbols
    key = out[:key_h]
    assert _is(key, PRED_COLOUR).any() and _is(key, GT_COLOUR).any() and _is(key, HALO_COLOUR).any()


def test_long_captions_wrap_to_the_image_width():
    sentence = "the small purple diamond next to the big orange star below the green square on the left"
    lines = wrap(sentence, 128)
    assert len(lines) >= 3 and " ".join(lines) == sentence
    assert all(font().getlength(line) <= 128 for line in lines)
    image, pred, gt = _two_objects(128)
    short = overlay_image(image, pred, gt, "the red one")
    long = overlay_image(image, pred, gt, sentence)
    assert long.width == short.width == 128
    assert long.height - short.height == 13 * (len(lines) - 1)  # one text line per wrapped line


def test_overlay_picker_chooses_the_best_worst_first_or_given_ids():
    ious = {10: 0.5, 11: 0.9, 12: 0.1, 13: 0.9, 14: 0.0, 15: 0.7}

    def chosen(pick, k, ids=None):
        picker = OverlayPicker(pick, k, ids)
        for sid, iou in ious.items():
            picker.offer(sid, iou, ("row", sid))
        return [s for s, _, _ in picker.chosen()]

    assert chosen("best", 3) == [11, 13, 15]  # equal IoU: the lower sent_id first
    assert chosen("worst", 2) == [14, 12]
    assert chosen("first", 2) == [10, 11]
    assert chosen("best", 0) == []
    assert chosen("first", 2, (15, 10, 99)) == [15, 10]  # the given order; an id not seen is not drawn
    assert chosen("best", 10) == [11, 13, 15, 10, 12, 14]


def _cell(head, t, blind, mean, std, n=3):
    cell = {"head": head, "noise_t": t, "text_blind": blind, "n_seeds": n}
    for k in figures.TABLE_COLUMNS:
        cell[f"{k}_mean"], cell[f"{k}_std"] = mean, std
    return cell


CELLS = [_cell("film", 0, False, 40.0, 2.0), _cell("film", 5, False, 35.5, 1.25), _cell("vpd", 0, False, 20.0, 3.0),
         _cell("film", 0, True, 12.0, 0.5), _cell("film", 5, True, 11.0, 0.75)]


def test_ablation_table_csv_and_plot_give_mean_and_std(tmp_path):
    md = figures.ablation_markdown(CELLS)
    assert "| Noise | P@0.5 | P@0.6 | P@0.7 | P@0.8 | P@0.9 | oIoU | mIoU | seeds |" in md
    assert "### head `film (no sentence)`" in md and "| 5 | " + " | ".join(["35.50 ± 1.25"] * 7) + " | 3 |" in md
    rows = list(csv.DictReader(open(figures.write_ablation_csv(CELLS, tmp_path / "a.csv"))))
    assert [(r["head"], r["text_blind"], r["noise_t"]) for r in rows] == [
        ("film", "0", "0"), ("film", "0", "5"), ("vpd", "0", "0"), ("film", "1", "0"), ("film", "1", "5")]
    assert (rows[1]["oIoU_mean"], rows[1]["oIoU_std"], rows[1]["n_seeds"]) == ("35.50", "1.25", "3")
    img = Image.open(figures.plot_ablation(CELLS, tmp_path / "a.png", chance={"oIoU": 8.0, "mIoU": 9.5}))
    assert img.width > 800 and img.height > 300


def _run(path, losses, oious):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for epoch, (loss, oiou) in enumerate(zip(losses, oious), start=1):
            f.write(json.dumps({"epoch": epoch, "loss": loss, "val": {"oIoU": oiou}}) + "\n")
    return path


def test_curves_average_the_seeds_of_each_cell(tmp_path):
    a = _run(tmp_path / "a", [1.0, 0.8, 0.7], [5.0, 9.0, 12.0])
    b = _run(tmp_path / "b", [1.1, 0.9, 0.6], [4.0, 10.0, 14.0])
    c = _run(tmp_path / "c", [1.2, 1.0], [3.0, 3.5])
    out = figures.plot_curves({"film T=0": [a, b], "vpd T=0": [c]}, tmp_path / "curves.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 350 and img.shape[1] > 1000
    assert img.std() > 5


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    make_cache(root / "c.zarr", 4, split="val")
    return open_cache(root / "c.zarr")


def test_feature_view_lays_attention_over_the_input_image(small_cache, tmp_path):
    tokens = ["<|startoftext|>", "the", "red", "circle", "left", "<|endoftext|>"]
    image = Image.fromarray(np.tile(np.array(RED, np.uint8), (64, 64, 1)))
    out = figures.feature_view(small_cache, 5, 0, tokens, tmp_path / "f.png", image=image)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[0] > 500  # two rows: input + PCA levels, then one attention panel per word
    reddish = (img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)
    assert reddish.sum() > 2000  # the input image shows (and shows through the attention)
    blended = figures.blend(np.full((8, 8, 3), 0.5, np.float32), np.eye(4, dtype=np.float32))
    assert blended.shape == (8, 8, 3)
    assert np.allclose(blended[0, 7], 0.5, atol=0.05) and not np.allclose(blended[0, 0], 0.5, atol=0.05)
