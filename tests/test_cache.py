"""The Zarr cache store: writer -> reader round trip, shards and done flags, resume, fingerprints,
refusals, non-finite features, skipped rows, determinism, plain-Zarr readability."""

import json
import os

import numpy as np
import pytest
import zarr
from _cache_util import fill, open_writer, random_contents, settings, store_files, tables, tiny_spec

from refseg.cache import CacheWriter, FeatureDataset, noise_group_name, open_cache
from refseg.cache.layout import FORMAT_VERSION, build_tables
from refseg.cache.opening import NewStore
from refseg.cache.writer import shard_slices
from refseg.core.errors import CacheError, CacheMismatchError, NonFiniteError


@pytest.fixture
def filled(tmp_path):
    """A finished store with noise levels 0 and 500, and the arrays it was written from."""
    writer = open_writer(tmp_path / "c.zarr")
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents)
    return tmp_path / "c.zarr", contents


def test_tables_are_sorted_and_consistent():
    samples, images = tables()
    assert list(images.image_id) == sorted(images.image_id)
    order = np.lexsort((samples.sent_id, samples.image_id))
    assert np.array_equal(order, np.arange(len(samples)))
    assert np.array_equal(images.image_id[samples.image_row], samples.image_id)
    assert len(samples) == 9 and len(images) == 5


def test_noise_group_name():
    assert noise_group_name(5) == "t0005"
    assert noise_group_name(500) == "t0500"
    with pytest.raises(ValueError):
        noise_group_name(10000)


def test_round_trip_every_array(filled):
    path, contents = filled
    samples, images = tables()
    cache = open_cache(path)
    assert cache.n_samples == 9 and cache.n_images == 5 and cache.shard_size == 4
    assert cache.noise_levels == [0, 500]
    assert cache.timestep(0) == 1 and cache.timestep(500) == 500
    assert cache.spec == tiny_spec()
    assert cache.extraction_record == json.loads(json.dumps(settings()))
    for name in ("sent_id", "ref_id", "ann_id", "image_id", "image_row"):
        assert cache.index[name].dtype == np.int64
        assert np.array_equal(cache.index[name], getattr(samples, name))
    assert cache.texts == samples.text and "ünïcode" in cache.texts[0]

    latents = cache.latents(slice(None))
    assert latents.dtype == np.float16 and latents.shape == (5, 4, 4, 4)
    assert np.array_equal(latents, contents["latent"])
    assert np.array_equal(cache.latents([4, 0]), contents["latent"][[4, 0]])
    emb = cache.embeddings(slice(None))
    assert emb.dtype == np.float16 and emb.shape == (9, 6, 8)
    assert np.array_equal(emb, contents["embedding"])
    assert np.array_equal(cache.embeddings([8, 2, 2]), contents["embedding"][[8, 2, 2]])
    mask = cache.attention_mask(slice(None))
    assert mask.dtype == np.uint8 and np.array_equal(mask, contents["attention_mask"])
    assert np.array_equal(cache.input_ids(slice(None)), contents["input_ids"])
    gt = cache.gt(slice(None))
    assert gt.dtype == np.uint8 and gt.shape == (9, 32, 32) and np.array_equal(gt, contents["gt"])
    assert np.array_equal(cache.gt(3), contents["gt"][3])

    root = zarr.open_group(str(path), mode="r")
    assert np.array_equal(root["images/orig_hw"][:], images.orig_hw)
    assert root["images/orig_hw"].dtype == np.int32
    assert np.array_equal(root["images/image_id"][:], images.image_id)

    for t in (0, 500):
        assert cache.done(t).all() and not cache.skipped(t).any()
        for row in range(9):
            item = cache.read(t, row)
            assert set(item) == {"s8", "s16", "s32", "attn_s16", "attn_s32"}
            for name, value in item.items():
                assert value.dtype == np.float16 and value.shape == cache.spec[name].shape
                assert np.array_equal(value, contents[("t", t)][name][row])
        only = cache.read(t, 2, names=["s16"])
        assert list(only) == ["s16"]
        assert np.array_equal(cache.read_rows(t, [5, 1], "s8"), contents[("t", t)]["s8"][[5, 1]])


def test_layout_chunks_and_shards(filled):
    path, _ = filled
    root = zarr.open_group(str(path), mode="r")
    s8 = root["t0500/s8"]
    assert s8.shape == (9, 8, 4, 4) and s8.chunks == (1, 8, 4, 4) and s8.shards == (4, 8, 4, 4)
    assert s8.metadata.dimension_names == ("sample", "s8_channel", "s8_y", "s8_x")
    assert root["t0500/done"].chunks == (4,)
    assert root["images/latent"].shards == (4, 4, 4, 4)
    assert root["t0500"].attrs["noise_t"] == 500 and root["t0500"].attrs["timestep"] == 500
    # one file per shard: 3 sample shards
    assert sorted(os.listdir(path / "t0500" / "s8" / "c")) == ["0", "1", "2"]
    assert sorted(os.listdir(path / "t0500" / "done" / "c")) == ["0", "1", "2"]
    attrs = root.attrs.asdict()
    assert attrs["refseg_cache"] == FORMAT_VERSION
    assert {"fingerprint", "backbone", "extraction", "dataset", "spec", "shard_size", "codec"} <= set(attrs)


def test_plain_zarr_reads_everything(filled):
    path, contents = filled
    root = zarr.open_group(str(path), mode="r")  # no refseg involved
    assert sorted(name for name, _ in root.groups()) == ["images", "index", "masks", "t0000", "t0500", "text"]
    assert np.array_equal(root["t0000/attn_s16"][:], contents[("t", 0)]["attn_s16"])
    assert np.array_equal(root["text/embedding"][:], contents["embedding"])
    assert np.array_equal(root["masks/gt"][:], contents["gt"])
    assert list(root["index/text"][:]) == tables()[0].text
    assert root["t0000/done"][:].all()


def test_shard_at_a_time_and_done_flags(tmp_path):
    writer = open_writer(tmp_path / "c.zarr")
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    writer.add_noise_level(5, timestep=5)
    assert writer.feature_shards_todo(5) == [slice(0, 4), slice(4, 8), slice(8, 9)]
    writer.write_features(5, slice(4, 8), {n: a[4:8] for n, a in contents[("t", 500)].items()})
    assert writer.feature_shards_todo(5) == [slice(0, 4), slice(8, 9)]
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.done(5).tolist() == [False] * 4 + [True] * 4 + [False]
    assert np.array_equal(cache.read(5, 6)["s8"], contents[("t", 500)]["s8"][6])
    assert not cache.read(5, 0)["s8"].any()  # not written: zeros, and not done
    # the last shard is short
    writer.write_features(5, slice(8, 9), {n: a[8:9] for n, a in contents[("t", 500)].items()})
    assert writer.feature_shards_todo(5) == [slice(0, 4)]

    # rows must be exactly one whole shard
    for bad in (slice(0, 3), slice(2, 6), slice(8, 12), slice(0, 4, 2), [0, 1, 2, 3]):
        with pytest.raises(ValueError, match="shard"):
            writer.write_features(5, bad, {n: a[0:4] for n, a in contents[("t", 500)].items()})
    with pytest.raises(ValueError, match="shard"):
        writer.write_latents(slice(1, 5), contents["latent"][1:5])
    with pytest.raises(ValueError, match="expected tensors"):
        writer.write_features(5, slice(0, 4), {"s8": contents[("t", 500)]["s8"][0:4]})
    with pytest.raises(ValueError, match="shape"):
        writer.write_text(slice(0, 4), contents["input_ids"][0:4], contents["attention_mask"][0:4],
                          contents["embedding"][0:4, :3], contents["gt"][0:4])


def test_parts_split_whole_shards():
    shards = shard_slices(10, 3)
    assert shards == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    parts = [shard_slices(10, 3, (i, 3)) for i in range(3)]
    assert parts == [[slice(0, 3), slice(9, 10)], [slice(3, 6)], [slice(6, 9)]]
    with pytest.raises(ValueError):
        shard_slices(10, 3, (3, 3))


def test_todo_by_part(tmp_path):
    writer = open_writer(tmp_path / "c.zarr")
    assert writer.text_shards_todo((0, 2)) == [slice(0, 4), slice(8, 9)]
    assert writer.text_shards_todo((1, 2)) == [slice(4, 8)]
    assert writer.image_shards_todo((1, 2)) == [slice(4, 5)]


def test_resume_skips_finished_shards(tmp_path):
    path = tmp_path / "c.zarr"
    writer = open_writer(path)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    writer.write_latents(slice(0, 4), contents["latent"][0:4])
    writer.write_text(slice(4, 8), contents["input_ids"][4:8], contents["attention_mask"][4:8],
                      contents["embedding"][4:8], contents["gt"][4:8])
    writer.add_noise_level(0, timestep=1)
    writer.write_features(0, slice(8, 9), {n: a[8:9] for n, a in contents[("t", 0)].items()})

    again = open_writer(path, shard_size=8)  # a different shard size is ignored: the store keeps its own
    assert again.shard_size == 4
    assert again.image_shards_todo() == [slice(4, 5)]
    assert again.text_shards_todo() == [slice(0, 4), slice(8, 9)]
    assert again.feature_shards_todo(0) == [slice(0, 4), slice(4, 8)]
    assert np.array_equal(again.latents(slice(0, 4)), contents["latent"][0:4])
    assert np.array_equal(again.embeddings([5, 4]), contents["embedding"][[5, 4]])
    assert np.array_equal(again.attention_mask(slice(4, 8)), contents["attention_mask"][4:8])
    # adding the same level again is a no-op that keeps its data
    again.add_noise_level(0, timestep=1)
    assert again.feature_shards_todo(0) == [slice(0, 4), slice(4, 8)]
    with pytest.raises(CacheMismatchError, match="timestep 1.*timestep 7"):
        again.add_noise_level(0, timestep=7)


def test_fingerprint_mismatch_names_keys_and_values(tmp_path):
    path = tmp_path / "c.zarr"
    first = open_writer(path)
    with pytest.raises(CacheMismatchError) as err:
        open_writer(path, image_size=64, latent_scaling="none")
    message = str(err.value)
    assert "extraction.image_size is 32 in the store but 64 now" in message
    assert "extraction.latent_scaling is 'sd' in the store but 'none' now" in message
    assert message.endswith("(use --overwrite to replace it)")
    assert "\n" not in message

    samples, images = tables()
    keep = np.arange(len(samples)) != 3
    fewer = type(samples)(samples.sent_id[keep], samples.ref_id[keep], samples.ann_id[keep],
                          samples.image_id[keep], samples.image_row[keep], [s for s, k in zip(samples.text, keep) if k])
    with pytest.raises(CacheMismatchError, match=r"samples\.n is 9 in the store but 8 now"):
        CacheWriter.open(path, NewStore(spec=first.spec, extraction_record=settings(), samples=fewer, images=images,
                                        shard_size=4))

    other_spec = tiny_spec().select(["s8", "s16"])
    with pytest.raises(CacheMismatchError, match=r"spec\.tensors"):
        CacheWriter.open(path, NewStore(spec=other_spec, extraction_record=settings(), samples=samples,
                                        images=images))

    # the spec follows from the settings: when both differ, the spec is summarised, not listed
    with pytest.raises(CacheMismatchError) as err:
        CacheWriter.open(path, NewStore(spec=other_spec, extraction_record=settings(token_length=7), samples=samples,
                                        images=images))
    assert "extraction.token_length is 6 in the store but 7 now; the feature spec differs accordingly" in str(err.value)
    assert "spec.tensors" not in str(err.value)

    # noise levels are not part of the fingerprint
    first.add_noise_level(5, timestep=5)
    assert open_writer(path).fingerprint == first.fingerprint


def test_overwrite_replaces_the_store(filled):
    path, _ = filled
    writer = open_writer(path, image_size=64, overwrite=True)
    assert writer.image_shards_todo() == [slice(0, 4), slice(4, 5)]
    cache = open_cache(path)
    assert cache.noise_levels == []
    assert cache.extraction_record["extraction"]["image_size"] == 64
    assert not cache.text_done().any()


def test_refuses_what_is_not_a_refseg_cache(tmp_path):
    spec, (samples, images) = tiny_spec(), tables()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    a_dir = tmp_path / "photos"
    a_dir.mkdir()
    (a_dir / "cat.jpg").write_bytes(b"\xff\xd8")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["something"] = 1
    for path in (a_file, a_dir, plain):
        for overwrite in (False, True):  # never deletes something that is not a cache
            with pytest.raises(CacheError, match="is not a refseg cache"):
                CacheWriter.open(path, NewStore(spec=spec, extraction_record=settings(), samples=samples,
                                                images=images), overwrite=overwrite)
        with pytest.raises(CacheError, match="is not a refseg cache"):
            open_cache(path)
    assert (a_dir / "cat.jpg").exists() and a_file.read_text() == "hello"
    with pytest.raises(CacheError, match="cache not found: .*missing.zarr"):
        open_cache(tmp_path / "missing.zarr")


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "c.zarr").mkdir()
    assert open_writer(tmp_path / "c.zarr").n_samples == 9


def test_newer_format_refused(filled):
    path, _ = filled
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["refseg_cache"] = FORMAT_VERSION + 1
    expected = f"written by a newer refseg (format {FORMAT_VERSION + 1}); upgrade refseg"
    with pytest.raises(CacheError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        open_cache(path)
    with pytest.raises(CacheError, match="newer refseg"):
        open_writer(path)
    assert open_writer(path, overwrite=True).n_samples == 9  # it is a refseg cache: overwrite may replace it


def test_interrupted_creation_is_redone(tmp_path):
    path = tmp_path / "c.zarr"
    zarr.open_group(str(path), mode="w", attributes={"refseg_cache_creating": 1})
    with pytest.raises(CacheError, match="not finished"):
        open_cache(path)
    writer = open_writer(path)
    assert open_cache(path).fingerprint == writer.fingerprint


def test_nan_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "c.zarr"
    writer = open_writer(path)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    writer.add_noise_level(0, timestep=1)
    arrays = {n: a[4:8].copy() for n, a in contents[("t", 0)].items()}
    arrays["s16"][1, 3, 0, 1] = np.nan
    arrays["attn_s32"][1, 0] = np.inf
    arrays["s8"][3, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError) as err:
        writer.write_features(0, slice(4, 8), arrays)
    sent = writer.index["sent_id"]
    message = str(err.value)
    assert f"sent_id {sent[5]} (s16, attn_s32)" in message and f"sent_id {sent[7]} (s8)" in message
    assert f"sent_id {sent[4]}" not in message
    cache = open_cache(path)
    assert not cache.done(0).any()
    assert not os.path.exists(path / "t0000" / "s8" / "c" / "1")  # the shard's data was never written
    assert not os.path.exists(path / "t0000" / "done" / "c" / "1")
    assert slice(4, 8) in writer.feature_shards_todo(0)
    # a float32 value that overflows float16 is caught too
    big = {n: a[0:4].astype(np.float32) for n, a in contents[("t", 0)].items()}
    big["s32"][2, 0, 0, 0] = 1e6
    with pytest.raises(NonFiniteError, match=f"sent_id {sent[2]} \\(s32\\)"):
        writer.write_features(0, slice(0, 4), big)
    # latents and text embeddings are checked too
    latent = contents["latent"][0:4].copy()
    latent[1] = np.nan
    with pytest.raises(NonFiniteError, match=f"image_id {writer.image_ids[1]}"):
        writer.write_latents(slice(0, 4), latent)
    assert not open_cache(path).images_done().any()


def test_skipped_rows(tmp_path):
    path = tmp_path / "c.zarr"
    writer = open_writer(path)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents, noise_levels=())
    writer.add_noise_level(0, timestep=1)
    arrays = {n: a[0:4].copy() for n, a in contents[("t", 0)].items()}
    arrays["s8"][2] = np.nan  # the reason it is skipped; not an error for a skipped row
    writer.write_features(0, slice(0, 4), arrays, skipped=np.array([False, False, True, False]))
    writer.record_bad([writer.index["sent_id"][2]], "NaN in s8")
    assert slice(0, 4) not in writer.feature_shards_todo(0)  # finished: every row done or skipped
    cache = open_cache(path)
    assert cache.done(0)[:4].tolist() == [True, True, False, True]
    assert cache.skipped(0)[:4].tolist() == [False, False, True, False]
    assert all(not v.any() for v in cache.read(0, 2).values())
    assert np.array_equal(cache.read(0, 3)["s8"], contents[("t", 0)]["s8"][3])
    assert cache.bad == [{"reason": "NaN in s8", "sent_id": int(writer.index["sent_id"][2])}]
    writer.record_bad(writer.index["sent_id"][[6, 2]], ["bad mask", "NaN in s8"])  # one reason each
    assert writer.bad_rows().tolist() == [2, 6]
    assert open_writer(path).bad_rows().tolist() == [2, 6]  # kept for a resumed run
    assert [b["reason"] for b in open_cache(path).bad] == ["NaN in s8", "bad mask"]
    with pytest.raises(ValueError, match="2 sent_ids but 1 reasons"):
        writer.record_bad([1, 2], ["x"])
    assert "skipped 1" in cache.describe() and "bad samples: 1" in cache.describe()
    assert FeatureDataset(path, 0).rows.tolist() == [0, 1, 3]


def test_missing_noise_level_lists_the_levels_present(filled):
    path, _ = filled
    cache = open_cache(path)
    with pytest.raises(CacheError) as err:
        cache.done(5)
    assert str(err.value) == f"noise level T=5 is not in cache {path} (it has T=0, 500)"
    with pytest.raises(CacheError, match="it has T=0, 500"):
        FeatureDataset(path, 5)
    with pytest.raises(CacheError, match="no noise levels yet"):
        open_cache(open_writer(path.parent / "empty.zarr").path).done(0)


def _write_all(path, reverse, codec):
    writer = open_writer(path, codec=codec)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents, reverse=reverse)
    bad = [(int(writer.index["sent_id"][1]), "a"), (int(writer.index["sent_id"][6]), "b")]
    for sent_id, reason in bad[::-1] if reverse else bad:
        writer.record_bad([sent_id], reason)


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc"])
def test_same_bytes_whatever_the_write_order(tmp_path, codec):
    _write_all(tmp_path / "a.zarr", reverse=False, codec=codec)
    _write_all(tmp_path / "b.zarr", reverse=True, codec=codec)
    a, b = store_files(tmp_path / "a.zarr"), store_files(tmp_path / "b.zarr")
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert differing == []
    assert "t0500/s8/c/2/0/0/0" in a


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_codecs_round_trip(tmp_path, codec):
    writer = open_writer(tmp_path / "c.zarr", codec=codec)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents)
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.codec == codec
    assert np.array_equal(cache.read_rows(500, slice(None), "s8"), contents[("t", 500)]["s8"])
    assert np.array_equal(cache.latents(slice(None)), contents["latent"])
    codecs = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["t0500/s8"].metadata.to_dict()["codecs"]
    assert codec in json.dumps(codecs)


def test_nbytes_and_describe(filled):
    path, _ = filled
    cache = open_cache(path)
    assert cache.nbytes() == sum(len(v) for v in store_files(path).values())
    text = cache.describe()
    for expected in ("fingerprint " + cache.fingerprint, "9 samples", "5 images", "T=0", "timestep 1",
                     "done 9/9", "T=500", "image_size: 32", "model: tiny", "attn_s16", "size on disk"):
        assert expected in text


def test_build_tables_accepts_objects():
    class Sample:
        def __init__(self, sent_id, image_id):
            self.sent_id, self.ref_id, self.ann_id, self.image_id = sent_id, 1, 2, image_id
            self.sentence = f"s{sent_id}"

    samples, images = build_tables([Sample(5, 9), Sample(3, 9), Sample(4, 2)], {9: (10, 20), 2: (30, 40)})
    assert samples.sent_id.tolist() == [4, 3, 5] and samples.image_row.tolist() == [0, 1, 1]
    assert samples.text == ["s4", "s3", "s5"]
    assert images.image_id.tolist() == [2, 9] and images.orig_hw.tolist() == [[30, 40], [10, 20]]


def test_empty_selection_is_a_user_error(tmp_path):
    samples, images = build_tables([], {})
    with pytest.raises(CacheError, match="empty"):
        CacheWriter.open(tmp_path / "c.zarr", NewStore(spec=tiny_spec(), extraction_record=settings(),
                                                       samples=samples, images=images))


def test_unfinished_noise_group_is_ignored_then_finished(tmp_path):
    writer = open_writer(tmp_path / "c.zarr")
    zarr.open_group(str(tmp_path / "c.zarr"), mode="r+").create_group("t0007")  # as if creation was cut short
    assert open_cache(tmp_path / "c.zarr").noise_levels == []
    writer.add_noise_level(7, timestep=7)
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.noise_levels == [7] and cache.timestep(7) == 7 and not cache.done(7).any()


def test_fsspec_url_store():
    url = "memory://refseg-test-cache/c.zarr"  # an fsspec URL, as s3:// would be
    writer = open_writer(url)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents)
    cache = open_cache(url)
    assert cache.noise_levels == [0, 500]
    assert np.array_equal(cache.read_rows(0, slice(None), "attn_s16"), contents[("t", 0)]["attn_s16"])
    assert open_writer(url).feature_shards_todo(500) == []
    assert cache.nbytes() > 0
    with pytest.raises(CacheError, match="cache not found"):
        open_cache("memory://refseg-test-cache/other.zarr")
