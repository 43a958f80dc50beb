"""FeatureDataset's batch arrays (cache/batch_buffers.py): reused once dropped, never while anything holds
them; shared memory in a DataLoader worker."""

import time

import numpy as np
import pytest
import torch
from _cache_util import filled_store

from refseg.cache import FeatureDataset
from refseg.cache.batch_buffers import POOLED_PER_SHAPE, BatchBuffers


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path, contents, _ = filled_store(tmp_path_factory.mktemp("cache") / "c.zarr")
    return path, contents


def _check(batch, contents, t=500):
    for name, value in batch["features"].items():
        assert torch.equal(value, torch.from_numpy(contents[("t", t)][name][batch["row"].numpy()])), name


def test_batches_kept_are_never_written_into(filled):
    """More batches alive than the pool holds: each keeps its own values."""
    path, contents = filled
    ds = FeatureDataset(path, 500)
    orders = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [8, 0, 4], [2, 2, 7], [5, 1, 3], [4, 6, 0]]
    assert len(orders) > POOLED_PER_SHAPE
    kept = [ds.__getitems__(order).batch for order in orders]
    for batch in kept:
        _check(batch, contents)
    pointers = {batch["features"]["s8"].data_ptr() for batch in kept}
    assert len(pointers) == len(orders)


def test_an_item_or_a_view_kept_keeps_its_batch(filled):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    item = ds.__getitems__([1, 2, 3])[1]  # the batch and the other items are dropped; this view is not
    plane = ds.__getitems__([4, 5, 6]).batch["features"]["s8"][0, 3]
    for order in ([6, 7, 8], [0, 5, 8], [3, 3, 3]) * 3:
        _check(ds.__getitems__(order).batch, contents)
    assert torch.equal(item["features"]["s8"], torch.from_numpy(contents[("t", 500)]["s8"][2]))
    assert torch.equal(plane, torch.from_numpy(contents[("t", 500)]["s8"][4, 3]))


def test_a_dropped_batch_is_read_into_again(filled):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    first = ds.__getitems__([0, 1, 2]).batch
    pointer = first["features"]["s16"].data_ptr()
    del first
    again = ds.__getitems__([5, 6, 7]).batch
    assert again["features"]["s16"].data_ptr() == pointer
    _check(again, contents)
    other_size = ds.__getitems__([5, 6]).batch  # another batch size: arrays of its own
    assert other_size["features"]["s16"].data_ptr() != pointer
    _check(other_size, contents)


def test_in_a_dataloader_worker_a_batch_is_new_shared_memory_read_by_one_thread(filled, monkeypatch):
    path, contents = filled
    ds = FeatureDataset(path, 500)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a worker process
    for order in ([0, 1, 2], [3, 4, 5], [0, 1, 2]):
        batch = ds.__getitems__(order).batch
        assert all(t.is_shared() for t in batch["features"].values())
        _check(batch, contents)
        del batch
    assert ds._cache._shard_files.threads == 1  # the workers are the parallel readers
    assert not ds._buffers._pools  # never pooled: the main process may still hold any of them
    array, tensor = BatchBuffers(shared=True).take((2, 3, 5), np.float16)
    array[...] = 1.5  # the array is the tensor's memory
    assert tensor.is_shared() and torch.equal(tensor, torch.full((2, 3, 5), 1.5, dtype=torch.float16))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_training_loader_over_many_epochs_gives_the_stored_values(filled, workers):
    from refseg.heads.batches import make_loader

    path, contents = filled
    ds = FeatureDataset(path, 500)
    order = [8, 3, 0, 5, 1, 7, 2, 6, 4]
    loader = make_loader(ds, 2, torch.device("cpu"), sampler=order, workers=workers)
    for _ in range(3):
        rows = []
        for batch in loader:
            _check(batch, contents)
            rows += batch["row"].tolist()
        assert rows == order


def test_threads_reading_one_dataset_at_once_get_their_own_arrays(filled, monkeypatch):
    """A thread-based loader (or a user's pool) calls the dataset from several threads: each batch still
    holds its own rows' values while others are read."""
    import types
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    import refseg.cache.batch_buffers as batch_buffers

    def slow_ref(obj):  # widen the window between finding a free array and marking it taken
        time.sleep(0.001)
        return weakref.ref(obj)

    monkeypatch.setattr(batch_buffers, "weakref", types.SimpleNamespace(ref=slow_ref))
    path, contents = filled
    ds = FeatureDataset(path, 500)
    orders = [[k % 9, (k + 4) % 9, (k + 7) % 9] for k in range(200)]

    def read_and_check(order):
        batch = ds.__getitems__(order).batch
        for _ in range(3):  # other threads take and drop arrays meanwhile
            _check(batch, contents)
        return batch["row"].tolist()

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: races show
    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(read_and_check, orders)) == orders
    finally:
        sys.setswitchinterval(interval)
