"""`refseg-probe attention`: content tokens, pointing and best-threshold mIoU against chance, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from _cli_util import one_line_error
from refseg.backbones.tokenizer_vocab import build_tokenizer
from refseg.cache.layout import build_tables
from refseg.cache.opening import NewStore
from refseg.cache.writer import CacheWriter
from refseg.core.feature_spec import FeatureSpec
from refseg.study.cli_probe import main
from refseg.study.probe import content_tokens, probe_attention, probe_table_md

UNET = {"block_out_channels": (8, 16, 16, 16), "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "layers_per_block": 2,
        "cross_attention_dim": 8, "in_channels": 4}
SIZE, L = 64, 10
SENTENCES = ("the big red circle", "the square on the left", "the small one next to the blue star",
             "the green diamond at the top", "the yellow triangle below the red one")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _tok(tokenizer, text):
    out = tokenizer([text], padding="max_length", max_length=L, truncation=True, return_tensors="np")
    return out["input_ids"][0], out["attention_mask"][0]


def test_content_tokens_skip_special_stop_words_and_padding(tokenizer):
    ids, mask = _tok(tokenizer, "the small one next to the blue star")
    got = content_tokens(tokenizer, ids, mask)
    # BOS the small one next to the blue star EOS: content = small, one, blue, star
    assert np.flatnonzero(got).tolist() == [2, 3, 7, 8]
    # a word the vocabulary splits into pieces: every piece of it is content, the stop word is not
    ids, mask = _tok(tokenizer, "the giraffe")
    pieces = int(mask.sum()) - 3  # minus BOS, "the", EOS
    assert pieces > 1
    assert np.flatnonzero(content_tokens(tokenizer, ids, mask)).tolist() == list(range(2, 2 + pieces))
    # nothing but stop words: all real tokens count
    ids, mask = _tok(tokenizer, "the of")
    assert np.flatnonzero(content_tokens(tokenizer, ids, mask)).tolist() == [1, 2]
    # padding the attention mask hides is never content, even when its id is a word's
    ids, mask = _tok(tokenizer, "the red circle")
    mask[3] = 0
    assert np.flatnonzero(content_tokens(tokenizer, ids, mask)).tolist() == [2]


def _write_cache(path, tokenizer, maps_kind: str, attn_strides=(8, 16), backbone=None, n_images: int = 12):
    """A store of n_images×2 samples: GT = a random box; attention maps built per `maps_kind`:
    'point' = content tokens peak inside the box and stop/special tokens peak far from it, 'random'."""
    spec = FeatureSpec.from_unet_config(UNET, image_size=SIZE, token_length=L, strides=(8,), attn_strides=attn_strides)
    samples, hw = [], {}
    for k in range(n_images):
        hw[k + 1] = (SIZE, SIZE)
        for j in range(2):
            samples.append({"sent_id": 2 * k + j, "ref_id": 2 * k + j, "ann_id": 2 * k + j, "image_id": k + 1,
                            "text": SENTENCES[(2 * k + j) % len(SENTENCES)]})
    tables, images = build_tables(samples, hw)
    settings = {"backbone": backbone or {"model": "tiny", "kind": "tiny"},
                "extraction": {"image_size": SIZE, "token_length": L, "latent_scaling": "sd", "noise_seed": 0},
                "dataset": {"name": "refcoco-synth", "split_by": "unc", "split": "val"}}
    writer = CacheWriter.open(path, NewStore(spec=spec, extraction_record=settings, samples=tables, images=images,
                                             shard_size=8, codec="none"), overwrite=False)
    rng = np.random.default_rng(0)
    n = writer.n_samples
    tok = [_tok(tokenizer, t) for t in tables.text]
    ids = np.stack([t[0] for t in tok]).astype(np.int32)
    amask = np.stack([t[1] for t in tok]).astype(np.uint8)
    gt = np.zeros((n, SIZE, SIZE), np.uint8)
    boxes = []
    for i in range(n):  # one 16×16 cell of a 4×4 grid (not the far corner): it holds the centre of
        y, x = (16 * int(v) for v in rng.integers(0, 3, size=2))  # every map cell it peaks in
        gt[i, y:y + 16, x:x + 16] = 1
        boxes.append((y + 8, x + 8))
    for rows in writer.image_shards_todo():
        writer.write_latents(rows, np.zeros((len(range(*rows.indices(writer.n_images))), 4, SIZE // 8, SIZE // 8),
                                            np.float16))
    for rows in writer.text_shards_todo():
        sl = range(*rows.indices(n))
        writer.write_text(rows, ids[rows], amask[rows], np.zeros((len(sl), L, 8), np.float16), gt[rows])
    writer.add_noise_level(0, timestep=1)
    feats = {}
    for info in spec.tensors:
        shape = (n, *info.shape)
        if info.kind != "attention":
            feats[info.name] = np.zeros(shape, np.float16)
            continue
        h = info.size
        if maps_kind == "random":
            feats[info.name] = rng.random(shape).astype(np.float16)
            continue
        a = np.full(shape, 0.01, np.float32)
        for i in range(n):
            content = content_tokens(tokenizer, ids[i], amask[i])
            cy, cx = (int(v * h / SIZE) for v in boxes[i])
            a[i, content, cy, cx] = 1.0
            a[i, ~content, h - 1, h - 1] = 5.0  # BOS, "the", padding: all at the far corner, strongly
        feats[info.name] = a.astype(np.float16)
    for rows in writer.feature_shards_todo(0):
        writer.write_features(0, rows, {k: v[rows] for k, v in feats.items()})
    return path, gt


def test_maps_on_the_object_point_at_it_and_random_maps_sit_near_chance(tmp_path, tokenizer):
    path, gt = _write_cache(tmp_path / "point.zarr", tokenizer, "point")
    rows = probe_attention(str(path))
    assert [(r["noise_t"], r["tensor"]) for r in rows] == [(0, "attn_s8"), (0, "attn_s16")]
    share = float(gt.reshape(len(gt), -1).mean(1).mean())
    for r in rows:
        assert r["n"] == 24 and r["skipped"] == 0
        assert r["pointing"] == 1.0
        assert r["pointing_chance"] == pytest.approx(share) and r["miou_chance"] == pytest.approx(share)
        assert r["miou"] > 0.3 > share
        assert r["threshold"] in [round(0.05 * k, 2) for k in range(1, 20)]
    random_rows = probe_attention(str(_write_cache(tmp_path / "random.zarr", tokenizer, "random")[0]))
    for r in random_rows:
        assert r["pointing"] <= 0.35  # chance is ~0.06; 24 samples
        assert r["miou"] < rows[0]["miou"]
    # a fixed threshold is used as given, and scores no better than the best one
    fixed = probe_attention(str(path), threshold=0.9)
    assert all(f["threshold"] == 0.9 and f["miou"] <= r["miou"] + 1e-12 for f, r in zip(fixed, rows))
    table = probe_table_md(rows)
    assert "| 0 | attn_s8 | 100.0 |" in table and table.count("\n") == 4


def test_cli_writes_the_table_and_csv(tmp_path, tokenizer):
    path, _ = _write_cache(tmp_path / "c.zarr", tokenizer, "point", n_images=4)
    out, csv = tmp_path / "probe.md", tmp_path / "probe.csv"
    result = CliRunner().invoke(main, ["attention", "--cache", str(path), "--out", str(out), "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "| 0 | attn_s16 | 100.0 |" in result.stdout
    assert out.read_text() in result.stdout
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("noise_t,tensor,stride,pointing") and len(lines) == 3
    assert lines[1].startswith("0,attn_s8,8,1.0,")
    assert result.stderr.splitlines() == [f"wrote {out}", f"wrote {csv}"]  # DESIGN §9: on stderr, what it wrote
    quiet = CliRunner().invoke(main, ["attention", "--cache", str(path), "--out", str(out), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


def test_one_line_errors(tmp_path, tokenizer):
    runner = CliRunner()
    no_attn, _ = _write_cache(tmp_path / "noattn.zarr", tokenizer, "point", attn_strides=(), n_images=2)
    one_line_error(runner.invoke(main, ["attention", "--cache", str(no_attn)]), "no cross-attention tensors")
    bad_model, _ = _write_cache(tmp_path / "nomodel.zarr", tokenizer, "point", n_images=2,
                                backbone={"model": str(tmp_path / "gone"), "kind": "folder"})
    one_line_error(runner.invoke(main, ["attention", "--cache", str(bad_model)]), "cannot load the tokenizer")
    ok, _ = _write_cache(tmp_path / "ok.zarr", tokenizer, "point", n_images=2)
    one_line_error(runner.invoke(main, ["attention", "--cache", str(ok), "--noise-t", "5"]), "T=5", "T=0")
    one_line_error(runner.invoke(main, ["attention", "--cache", str(ok), "--threshold", "1.5"]), "--threshold")
    one_line_error(runner.invoke(main, ["attention", "--cache", str(tmp_path / "missing.zarr")]))
