"""refseg-extract --prompt empty: the no-sentence baseline's cache. Every sample is encoded as the empty
prompt, so the sentences of one image get the same features; the index and the GT stay the sentences'."""

import numpy as np
import pytest

from refseg.cache import open_cache
from refseg.core.errors import CacheError
from refseg.core.synthetic import generate
from refseg.extract.config import ExtractionConfig
from refseg.extract.pipeline import run_extraction
from refseg.study.probe import probe_attention


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty-prompt")
    generate(root / "data", images=10, seed=0, image_size=64)
    out = {}
    # batch 1: one denoiser run per sentence; batch 4: one per image of the batch (extract/pipeline.py)
    for name, prompt, batch in (("sentence", "sentence", 4), ("empty", "empty", 4), ("empty-1", "empty", 1)):
        cfg = ExtractionConfig(data_root=str(root / "data"), dataset="refcoco-synth", split="train",
                               out=str(root / f"{name}.zarr"), model="tiny", noise_ts=(0, 500), image_size=64,
                               token_length=16, batch_size=batch, device="cpu", progress=False, prompt=prompt)
        run_extraction(cfg)
        out[name] = open_cache(cfg.out)
    return out


def test_one_run_per_image_gives_the_bytes_of_one_run_per_sentence(stores):
    rows = list(range(stores["empty"].n_samples))
    for t in (0, 500):
        for name in stores["empty"].spec.names:
            assert np.array_equal(stores["empty"].read_rows(t, rows, name), stores["empty-1"].read_rows(t, rows, name))


def _same_image_rows(cache):
    rows = cache.index["image_row"]
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            if rows[a] == rows[b]:
                return a, b
    raise AssertionError("no image with two sentences")


def test_every_sentence_of_an_image_gets_the_empty_prompts_features(stores):
    sentence, empty = stores["sentence"], stores["empty"]
    a, b = _same_image_rows(empty)
    rows = list(range(empty.n_samples))
    # the text arrays hold the empty prompt's tokens and embedding, the same for every sample
    ids, emb = empty.input_ids(rows), empty.embeddings(rows)
    assert (ids == ids[0]).all() and (emb == emb[0]).all() and int(empty.attention_mask([0])[0].sum()) == 2
    assert not (sentence.embeddings(rows) == sentence.embeddings(rows)[0]).all()
    for t in (0, 500):
        for name in empty.spec.names:
            x, y = empty.read_rows(t, [a, b], name)
            assert np.array_equal(x, y), (t, name)  # one image, one prompt: one set of features
            s_x, s_y = sentence.read_rows(t, [a, b], name)
            assert not np.array_equal(s_x, s_y), (t, name)  # two sentences condition the UNet differently
    # what the samples are is unchanged: sentences, ids, GT masks and latents
    assert empty.texts == sentence.texts and list(empty.index["sent_id"]) == list(sentence.index["sent_id"])
    assert np.array_equal(empty.gt(rows), sentence.gt(rows))
    images = list(range(len(empty.images_done())))
    assert np.array_equal(empty.latents(images), sentence.latents(images))


def test_the_prompt_is_recorded_only_when_empty_and_the_probe_refuses_such_a_cache(stores):
    assert stores["empty"].extraction_record["extraction"]["prompt"] == "empty"
    assert "prompt" not in stores["sentence"].extraction_record["extraction"]  # earlier stores keep their fingerprint
    assert stores["empty"].fingerprint != stores["sentence"].fingerprint
    with pytest.raises(CacheError, match="was extracted with --prompt empty: its attention maps follow no sentence"):
        probe_attention(stores["empty"])


def test_the_no_sentence_store_holds_each_image_once(stores):
    """Issue 24, item 2: one row per image in each noise level, read by every sentence of the image."""
    empty, sentence = stores["empty"], stores["sentence"]
    root = empty._root
    n, m = empty.n_samples, empty.n_images
    assert m < n and root["t0000/s8"].shape[0] == m and root["t0000/done"].shape[0] == m
    assert root["t0000"].attrs["rows"] == "image" and "rows" not in sentence._root["t0000"].attrs
    assert sentence._root["t0000/s8"].shape[0] == n
    image_row = empty.index["image_row"]
    for t in (0, 500):
        assert empty.done(t).shape == (n,) and empty.done(t).all() and empty.coverage(t).complete
        every = empty.read_rows(t, list(range(n)), "s16")
        per_image = root[f"t{t:04d}/s16"][:]
        assert np.array_equal(every, per_image[image_row])  # each sentence reads its image's row
        assert np.array_equal(empty.read(t, n - 1)["s16"], per_image[image_row[n - 1]])
    from refseg.cache.layout import store_nbytes

    sizes = [store_nbytes(str(c.path) + "/t0000/s8") for c in (empty, sentence)]
    assert sizes[0] * (n / m) == pytest.approx(sizes[1], rel=0.05)  # sentences-per-image times smaller


def test_a_dataset_over_the_no_sentence_store_yields_every_sentence(stores):
    from refseg.cache.dataset import FeatureDataset

    empty = stores["empty"]
    for preload in (False, True):
        data = FeatureDataset(empty.path, 500, names=["s8"], preload=preload)
        assert len(data) == empty.n_samples
        a, b = _same_image_rows(empty)
        assert np.array_equal(data[a]["features"]["s8"], data[b]["features"]["s8"])
        assert not np.array_equal(data[a]["gt"], data[b]["gt"]) or empty.index["ref_id"][a] == empty.index["ref_id"][b]


def test_damage_in_the_no_sentence_store_names_images_and_is_repaired(stores, tmp_path):
    import shutil

    from click.testing import CliRunner

    from refseg.cache.cli import main as cache_cli
    from refseg.core.errors import DamagedCacheError

    store = tmp_path / "empty.zarr"
    shutil.copytree(stores["empty"].path, store)
    (store / "t0500" / "s8" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(DamagedCacheError, match=r"t0500/s8 rows? 0.*\(image_id "):
        open_cache(store).read_rows(500, [0], "s8")
    found = CliRunner().invoke(cache_cli, ["verify", str(store)])
    assert found.exit_code == 2 and "damaged: t0500/s8: rows 0" in found.output and "(image_id " in found.output
    assert CliRunner().invoke(cache_cli, ["verify", str(store), "--repair"]).exit_code == 0
    assert not open_cache(store).done(500)[open_cache(store).index["image_row"] == 0].any()
