"""Direct shard-file reads (cache/fastread.py): the same values as zarr, the fallbacks, corrupt files."""

import os

import numpy as np
import pytest
import zarr
from _cache_util import fill, open_writer, random_contents

from refseg.cache import FeatureDataset, open_cache
from refseg.cache.fastread import ShardFiles, ShardRowReader
from refseg.core.errors import CacheError

PER_ROW_READS = ("gt", "embeddings", "attention_mask", "input_ids")


def _store(path, codec="none", zero_rows=(), feature_shards=None):
    """A filled store; `zero_rows` get all-zero features and GT (zarr writes no chunk for those);
    `feature_shards` limits T=0 to the first shards (the other shard files never exist)."""
    writer = open_writer(path, codec=codec)
    contents = random_contents(writer.spec, writer.n_samples, writer.n_images, noise_levels=(0,))
    for r in zero_rows:
        contents["gt"][r] = 0
        contents["embedding"][r] = 0
        for a in contents[("t", 0)].values():
            a[r] = 0
    if feature_shards is None:
        fill(writer, contents, noise_levels=(0,))
    else:
        fill(writer, contents, noise_levels=())
        writer.add_noise_level(0, timestep=1)
        for rows in writer.feature_shards_todo(0)[:feature_shards]:
            writer.write_features(0, rows, {name: a[rows] for name, a in contents[("t", 0)].items()})
    return contents


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_row_equals_zarrs_including_unwritten_chunks_and_shards(tmp_path):
    path = tmp_path / "c.zarr"
    contents = _store(path, zero_rows=(2, 5), feature_shards=1)  # shard size 4: rows 4.. have no T=0 files
    direct, through_zarr = open_cache(path), open_cache(path, direct_reads=False)
    assert not os.path.exists(path / "t0000" / "s8" / "c" / "1")  # shard 1 of s8 was never written
    for r in range(direct.n_samples):
        a, b = direct.read(0, r), through_zarr.read(0, r)
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        expected = contents[("t", 0)]["s8"][r] if r < 4 else np.zeros_like(a["s8"])
        assert _same(a["s8"], expected)
        for read in PER_ROW_READS:
            assert _same(getattr(direct, read)(r), getattr(through_zarr, read)(r)), (read, r)
    for image in range(direct.n_images):
        assert _same(direct.latents(image), through_zarr.latents(image))
    assert not direct.gt(5).any() and _same(direct.gt(3), contents["gt"][3])
    # every per-row array took the direct path, and none of them went back to zarr
    assert direct._row_readers and all(r is not None for r in direct._row_readers.values())


def test_compressed_arrays_fall_back_to_zarr_and_read_the_same(tmp_path):
    path = tmp_path / "z.zarr"
    contents = _store(path, codec="blosc")
    root = zarr.open_group(path, mode="r")
    files = ShardFiles()
    assert ShardRowReader.for_array(root["t0000/s8"], files) is None  # blosc-compressed chunks
    assert ShardRowReader.for_array(root["text/embedding"], files) is None
    assert ShardRowReader.for_array(root["masks/gt"], files) is not None  # zstd whatever the store's codec
    assert ShardRowReader.for_array(root["index/sent_id"], files) is None  # not sharded per row
    ds = FeatureDataset(path, 0)
    for i in range(len(ds)):
        item = ds[i]
        assert np.array_equal(item["features"]["attn_s16"].numpy(), contents[("t", 0)]["attn_s16"][i])
        assert np.array_equal(item["gt"].numpy(), contents["gt"][i])


def _descriptors_into(path) -> int:
    """How many of this process's file descriptors are open on files under `path` (the process's other
    descriptors come and go with the garbage collector and other threads: counting them all was flaky)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{path}{os.sep}")
        except OSError:  # closed since the listing
            pass
    return count


def test_open_files_stay_within_the_lru_capacity(tmp_path):
    path = tmp_path / "c.zarr"
    contents = _store(path)
    cache = open_cache(path)
    cache._shard_files = files = ShardFiles(capacity=2)
    fds_before = _descriptors_into(path)
    for r in [0, 4, 8, 0, 4, 8, 1]:  # three shards, visited twice
        assert _same(cache.read(0, r, ["s16"])["s16"], contents[("t", 0)]["s16"][r])
        assert len(files) <= 2
    assert _descriptors_into(path) - fds_before == 2
    files.close()
    assert len(files) == 0 and _descriptors_into(path) == fds_before


def _shard_file(path, array="t0000/s32", shard=1):
    return path / array / "c" / str(shard) / "0" / "0" / "0"


def test_a_corrupt_shard_index_is_named_not_read(tmp_path):
    path = tmp_path / "c.zarr"
    _store(path)
    shard = _shard_file(path)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the last index byte before the CRC
    shard.write_bytes(bytes(data))
    ds = FeatureDataset(path, 0, names=["s32"])
    assert ds[0]["features"]["s32"].shape == (16, 1, 1)  # shard 0 is intact
    with pytest.raises(CacheError, match=r"s32/c/1/0/0/0 is corrupt: its index fails its CRC-32C check"):
        ds[5]


def test_a_truncated_shard_file_is_named(tmp_path):
    path = tmp_path / "c.zarr"
    _store(path)
    shard = _shard_file(path, "t0000/s8")
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CacheError, match=r"s8/c/1/0/0/0 is truncated \(10 bytes, shorter than its index\)"):
        open_cache(path).read(0, 4, ["s8"])
    with pytest.raises(IndexError, match="row 99 out of range"):
        open_cache(path).read(0, 99)


@pytest.mark.parametrize("rows", [slice(0, 9), slice(2, 7), slice(-3, None), slice(6, 2), [8, 1, 1, 4], []])
def test_several_rows_at_once_equal_zarrs(tmp_path, rows):
    path = tmp_path / "c.zarr"
    contents = _store(path, zero_rows=(4,), feature_shards=2)  # rows 8.. have no T=0 shard file
    direct, through_zarr = open_cache(path), open_cache(path, direct_reads=False)
    for name in direct.spec.names:
        a, b = direct.read_rows(0, rows, name), through_zarr.read_rows(0, rows, name)
        assert _same(a, b)
    assert _same(direct.gt(rows), contents["gt"][rows])
    # stepped slices are zarr's business; they still read right
    assert _same(direct.embeddings(slice(0, 9, 2)), contents["embedding"][0:9:2])


def test_zstd_chunks_are_read_directly_with_the_same_values(tmp_path):
    """A zstd store's rows (and every format-3 store's GT masks) are decoded from their frames here, not by zarr."""
    path = tmp_path / "z.zarr"
    _store(path, codec="zstd", zero_rows=(2,))
    direct, through_zarr = open_cache(path), open_cache(path, direct_reads=False)
    for r in range(direct.n_samples):
        assert all(_same(a, b) for a, b in zip(direct.read(0, r).values(), through_zarr.read(0, r).values()))
        for read in PER_ROW_READS:
            assert _same(getattr(direct, read)(r), getattr(through_zarr, read)(r)), (read, r)
    assert direct._row_readers and all(r is not None for r in direct._row_readers.values())


def test_a_damaged_zstd_frame_is_named_not_decoded(tmp_path):
    from refseg.core.errors import DamagedCacheError

    path = tmp_path / "c.zarr"
    _store(path)
    shard = path / "masks" / "gt" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF  # inside row 0's frame (a few hundred bytes), far from the index at the end
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedCacheError, match=r"masks/gt rows? 0\b.*checksum mismatch"):
        open_cache(path).gt(0)


# ---- rows read by several threads (ShardFiles.map) ----------------------------------------------------
@pytest.fixture
def every_row_in_parallel(monkeypatch):
    """The tiny stores' rows are bytes long: read every one of them on the threads."""
    import refseg.cache.fastread

    monkeypatch.setattr(refseg.cache.fastread, "PARALLEL_ROW_BYTES", 0)


@pytest.mark.parametrize("threads", [2, 4])
def test_rows_read_by_threads_equal_those_read_in_turn_even_with_one_open_file(tmp_path, every_row_in_parallel,
                                                                             threads):
    """Threads share the LRU: with room for one open file, every read evicts a file another thread may be
    reading; each still reads its own file's bytes, and no descriptor is left open."""
    path = tmp_path / "c.zarr"
    contents = _store(path, zero_rows=(4,), feature_shards=2)
    in_turn, parallel = open_cache(path, read_threads=1), open_cache(path, read_threads=threads)
    parallel._shard_files = files = ShardFiles(capacity=1, threads=threads)
    fds_before = _descriptors_into(path)
    rows = [8, 1, 5, 0, 7, 2, 6, 3, 4, 1, 8, 0] * 3
    for _ in range(5):
        for name in parallel.spec.names:
            assert _same(parallel.read_rows(0, rows, name), in_turn.read_rows(0, rows, name)), name
        assert _same(parallel.gt(rows), contents["gt"][rows])
    assert _same(parallel.read_rows(0, rows, "s8")[1:8], contents[("t", 0)]["s8"][rows[1:8]])  # row 8: no file
    assert len(files) <= 1
    files.close()
    assert len(files) == 0 and _descriptors_into(path) == fds_before + len(in_turn._shard_files)


def test_of_two_damaged_rows_read_by_threads_the_first_asked_for_is_named(tmp_path, every_row_in_parallel):
    """Two damaged rows in one read: whichever thread fails first, the error names the one asked for first."""
    from refseg.core.errors import DamagedCacheError

    path = tmp_path / "c.zarr"
    _store(path)
    for shard, row_in_shard in ((0, 1), (1, 2)):  # rows 1 and 6 (shard size 4)
        file = _shard_file(path, "t0000/s8", shard)
        data = bytearray(file.read_bytes())
        data[row_in_shard * (8 * 4 * 4 * 2 + 4) + 7] ^= 0x01  # inside that row's bytes
        file.write_bytes(bytes(data))
    cache = open_cache(path, read_threads=4)
    for _ in range(10):
        with pytest.raises(DamagedCacheError, match=r"t0000/s8 rows? 6\b.*checksum mismatch"):
            cache.read_rows(0, [7, 6, 0, 2], "s8")
        with pytest.raises(DamagedCacheError, match=r"t0000/s8 rows? 1\b.*checksum mismatch"):
            cache.read_rows(0, [7, 1, 6, 2], "s8")
    assert _same(cache.read_rows(0, [0, 2, 3], "s8"), open_cache(path, direct_reads=False).read_rows(0, [0, 2, 3], "s8"))


def test_a_forked_child_reads_with_threads_of_its_own(tmp_path, every_row_in_parallel):
    """The parent's read threads do not exist in a forked child; the child starts its own instead of
    queueing work for threads that never run (a hang)."""
    import multiprocessing

    path = tmp_path / "c.zarr"
    contents = _store(path)
    cache = open_cache(path, read_threads=2)
    assert _same(cache.read_rows(0, [3, 1, 2], "s16"), contents[("t", 0)]["s16"][[3, 1, 2]])  # the pool started
    context = multiprocessing.get_context("fork")  # a forked Process's target and arguments are not pickled
    results = context.Queue()
    child = context.Process(target=lambda: results.put(cache.read_rows(0, [5, 0, 7], "s16")))
    child.start()
    try:
        got = results.get(timeout=60)  # a hang fails here
    finally:
        child.join(10)
        child.kill()
    assert _same(got, contents[("t", 0)]["s16"][[5, 0, 7]])


def test_rows_into_a_given_array(tmp_path):
    path = tmp_path / "c.zarr"
    contents = _store(path)
    direct, through_zarr = open_cache(path), open_cache(path, direct_reads=False)
    for cache in (direct, through_zarr):
        out = np.full((3, 8, 4, 4), 7, np.float16)
        assert cache.read_rows(0, [6, 0, 2], "s8", out=out) is out
        assert _same(out, contents[("t", 0)]["s8"][[6, 0, 2]])
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float16 array of shape \(3, 8, 4, 4\), "
                                         r"got float32 \(3, 8, 4, 4\)"):
        direct.read_rows(0, [6, 0, 2], "s8", out=np.empty((3, 8, 4, 4), np.float32))


def test_ctrl_c_during_threaded_reads_returns_only_once_the_running_reads_end():
    """Reads still queued are dropped; those already running end before the interrupt reaches the caller,
    so none writes into a batch array after the caller has moved on (FeatureDataset reuses them).

    No timer: the second read to start sends the SIGINT, and the running reads end only after the main
    thread has taken it (a timed signal failed once on a loaded machine, arriving after the reads)."""
    import signal
    import threading
    import time

    files = ShardFiles(threads=2)
    started, ended, lock = set(), set(), threading.Lock()
    taken = threading.Event()
    main = threading.main_thread().ident

    def on_sigint(signum, frame):
        taken.set()
        raise KeyboardInterrupt

    def slow_read(item):
        with lock:
            started.add(item)
            both_running = len(started) == 2
        if both_running:
            signal.pthread_kill(main, signal.SIGINT)
        taken.wait(60)
        time.sleep(0.5)  # the main thread drops the queued reads meanwhile, then waits for these two
        ended.add(item)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            files.map(slow_read, range(6))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert taken.is_set()
    assert started == ended == {0, 1}  # the two running reads ended; the four queued never started
    files.map(slow_read, [7, 8])  # the threads serve the next read
    assert ended == {0, 1, 7, 8}
