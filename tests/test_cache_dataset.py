"""FeatureDataset: items, row selection, lazy per-process opening through DataLoader workers, preload."""

import pickle

import pytest
import torch
from _cache_util import fill, filled_store, open_writer, random_contents

from refseg.cache import FeatureDataset
from refseg.core.errors import CacheError


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path, contents, writer = filled_store(tmp_path_factory.mktemp("cache") / "c.zarr")
    return path, contents


def _check_item(item, contents, t, names=None, text=True):
    row = item["row"]
    expected = contents[("t", t)]
    assert set(item["features"]) == set(names or expected)
    for name, value in item["features"].items():
        assert value.dtype == torch.float16
        assert torch.equal(value, torch.from_numpy(expected[name][row]))
    assert item["gt"].dtype == torch.uint8 and item["gt"].shape == (32, 32)
    assert torch.equal(item["gt"], torch.from_numpy(contents["gt"][row]))
    if text:
        assert item["text_embedding"].dtype == torch.float16 and item["text_embedding"].shape == (6, 8)
        assert torch.equal(item["text_embedding"], torch.from_numpy(contents["embedding"][row]))
        assert item["text_mask"].dtype == torch.bool
        assert torch.equal(item["text_mask"], torch.from_numpy(contents["attention_mask"][row].astype(bool)))
    else:
        assert "text_embedding" not in item and "text_mask" not in item


def test_items_match_what_was_written(filled):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    assert len(ds) == 9 and ds.rows.tolist() == list(range(9))
    assert ds._cache is None  # nothing kept open before the first item
    for i in range(len(ds)):
        item = ds[i]
        assert item["row"] == i
        _check_item(item, contents, 500)
    assert ds[-1]["row"] == 8
    with pytest.raises(IndexError):
        ds[9]


def test_names_rows_and_text(filled):
    path, contents = filled
    ds = FeatureDataset(path, 0, names=["s16", "attn_s16"], rows=[7, 2, 5], text=False)
    assert len(ds) == 3 and ds.rows.tolist() == [7, 2, 5]
    assert [ds[i]["row"] for i in range(3)] == [7, 2, 5]
    for i in range(3):
        _check_item(ds[i], contents, 0, names=["s16", "attn_s16"], text=False)
    with pytest.raises(CacheError, match="s4 not in cache"):
        FeatureDataset(path, 0, names=["s4"])
    with pytest.raises(CacheError, match="outside cache"):
        FeatureDataset(path, 0, rows=[3, 9])


def test_rows_default_to_done_only(tmp_path):
    writer = open_writer(tmp_path / "c.zarr")
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images)
    fill(writer, contents, noise_levels=())
    writer.add_noise_level(5, timestep=5)
    with pytest.raises(CacheError, match="no finished samples at T=5"):
        FeatureDataset(tmp_path / "c.zarr", 5)
    writer.write_features(5, slice(4, 8), {n: a[4:8] for n, a in contents[("t", 500)].items()})
    ds = FeatureDataset(tmp_path / "c.zarr", 5)
    assert ds.rows.tolist() == [4, 5, 6, 7]
    with pytest.raises(CacheError, match="1 selected rows have no features at T=5"):
        FeatureDataset(tmp_path / "c.zarr", 5, rows=[4, 8])


def test_pickles_without_zarr_objects(filled):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    ds[0]  # opens the store in this process
    assert ds._cache is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._cache is None and clone.path == ds.path
    _check_item(clone[4], contents, 500)


def test_dataloader_with_two_workers(filled):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    ds[0]  # a handle opened in the parent must not be reused by forked workers
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    rows, feats = [], []
    for batch in loader:
        assert batch["features"]["s8"].shape[1:] == (8, 4, 4)
        assert batch["text_mask"].dtype == torch.bool
        rows += batch["row"].tolist()
        feats.append(batch["features"]["s8"])
    assert rows == list(range(9))
    assert torch.equal(torch.cat(feats), torch.from_numpy(contents[("t", 500)]["s8"]))


def test_dataloader_with_spawned_workers(filled):
    path, contents = filled
    ds = FeatureDataset(path, 0, names=["s32"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="spawn")
    got = torch.cat([batch["features"]["s32"] for batch in loader])
    assert torch.equal(got, torch.from_numpy(contents[("t", 0)]["s32"]))


def test_preload_gives_identical_items(filled):
    path, contents = filled
    lazy = FeatureDataset(path, 500, rows=[8, 0, 1, 2, 5])
    pre = FeatureDataset(path, 500, rows=[8, 0, 1, 2, 5], preload=True)
    assert pre._data is not None
    for i in range(len(lazy)):
        a, b = lazy[i], pre[i]
        assert a["row"] == b["row"]
        for key in ("gt", "text_embedding", "text_mask"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
        for name in a["features"]:
            assert torch.equal(a["features"][name], b["features"][name])
    expected = sum(v.nbytes for v in pre._data.values())
    assert FeatureDataset.preload_bytes(path, 500, rows=[8, 0, 1, 2, 5]) == expected == pre.nbytes()
    assert FeatureDataset.preload_bytes(path, 500, names=["s8"], text=False) == 9 * (8 * 4 * 4 * 2 + 32 * 32)
    # preloaded datasets go through workers too
    loader = torch.utils.data.DataLoader(pre, batch_size=5, num_workers=2)
    batch = next(iter(loader))
    assert batch["row"].tolist() == [8, 0, 1, 2, 5]


def test_preload_refuses_more_than_available_ram(filled, monkeypatch):
    import refseg.cache.dataset

    path, _ = filled
    monkeypatch.setattr(refseg.cache.dataset, "available_memory", lambda: 1000)
    with pytest.raises(CacheError, match=r"needs 0.00 GB of RAM but 0.00 GB is available"):
        FeatureDataset(path, 500, preload=True)


@pytest.mark.parametrize("preload", [False, True])
def test_a_batch_read_whole_equals_the_items_stacked_and_refseg_takes_it_without_a_copy(filled, preload):
    """FeatureDataset.__getitems__ reads a batch whole: a plain DataLoader stacks its items as usual, refseg's
    loader (heads.batches.make_loader) takes the batch as read; the same values and types either way."""
    from torch.utils.data import default_collate

    from refseg.cache.dataset import CollatedItems
    from refseg.heads.batches import collate_items, make_loader

    path, contents = filled
    ds = FeatureDataset(path, 500, rows=[7, 2, 2, 5, 0, 8], preload=preload)
    order = [4, 0, 3, 1, 5, 2]  # shuffled, a row twice
    items = ds.__getitems__(order[:4])
    assert isinstance(items, CollatedItems) and len(items) == 4
    for k, item in enumerate(items):
        assert item["row"] == ds.rows[order[k]]
        _check_item(item, contents, 500)
    stacked = default_collate(list(items))
    taken = collate_items(items)
    assert taken is items.batch  # no copy
    for key in ("gt", "row", "text_embedding", "text_mask"):
        assert taken[key].dtype == stacked[key].dtype and torch.equal(taken[key], stacked[key]), key
    assert all(torch.equal(taken["features"][n], stacked["features"][n]) for n in stacked["features"])

    cpu = torch.device("cpu")
    ours = list(make_loader(ds, 4, cpu, sampler=order))
    plain = list(torch.utils.data.DataLoader(ds, batch_size=4, sampler=order))
    assert [b["row"].tolist() for b in ours] == [b["row"].tolist() for b in plain] == [[0, 7, 5, 2], [8, 2]]
    for a, b in zip(ours, plain):
        assert torch.equal(a["gt"], b["gt"]) and torch.equal(a["text_embedding"], b["text_embedding"])
        assert all(torch.equal(a["features"][n], b["features"][n]) for n in b["features"])
