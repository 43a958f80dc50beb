"""ShardBuffer turns rows arriving in any batch size into whole shards; BackgroundWriter re-raises."""

import numpy as np
import pytest

from refseg.extract.shard_buffer import BackgroundWriter, ShardBuffer


def test_rows_in_any_order_make_whole_shards():
    flushed = []
    shards = [slice(0, 3), slice(3, 6), slice(6, 7)]
    buf = ShardBuffer(shards, lambda s, a, skipped: flushed.append((s, a["x"].copy(), skipped.copy())))
    for row in [3, 0, 6, 1, 4, 5, 2]:
        buf.add(row, {"x": np.full((2,), row, np.int32)}, skipped=(row == 4))
    assert [f[0] for f in flushed] == [slice(6, 7), slice(3, 6), slice(0, 3)]
    s, x, skipped = flushed[1]
    assert x[:, 0].tolist() == [3, 4, 5] and skipped.tolist() == [False, True, False]
    assert buf.pending_rows == 0


def test_background_writer_raises_first_error_and_drops_the_rest():
    done = []
    io = BackgroundWriter()
    io.submit(done.append, 1)
    io.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        for i in range(2, 50):
            io.submit(done.append, i)
        io.close()
    assert done == [1]  # writes after the failed one are dropped, never half-applied


def test_rows_are_copied_when_added_so_the_caller_may_reuse_its_buffer():
    flushed = []
    buf = ShardBuffer([slice(0, 2)], lambda s, a, skipped: flushed.append(a["x"]))
    staging = np.zeros((2, 3), np.float16)  # one reused host buffer, as a pinned staging area is
    for row in (0, 1):
        staging[:] = row + 1
        buf.add(row, {"x": staging[0]})
    assert flushed[0].tolist() == [[1, 1, 1], [2, 2, 2]]


def test_rows_added_as_a_block_flush_whole_shards_without_a_copy():
    flushed = []
    buf = ShardBuffer([slice(0, 2), slice(2, 4), slice(4, 6)], lambda s, a, skipped: flushed.append((s, a)))
    block = {"x": np.arange(10, 15, dtype=np.int32).reshape(5, 1)}
    buf.add_rows(1, block, 5)  # rows 1..5: shard 0 in part, shards 1 and 2 whole (row 0 still missing)
    assert [s for s, _ in flushed] == [slice(2, 4), slice(4, 6)]
    assert all(np.shares_memory(a["x"], block["x"]) for _, a in flushed)  # views: no copy
    assert flushed[0][1]["x"][:, 0].tolist() == [11, 12]
    buf.add(0, {"x": np.array([9], np.int32)})
    s, a = flushed[-1]
    assert s == slice(0, 2) and a["x"][:, 0].tolist() == [9, 10] and not np.shares_memory(a["x"], block["x"])
    # a view is never taken back as a buffer for another shard (its memory is the caller's); a copy is
    buf.release(flushed[0][1])
    buf.release(a)
    assert len(buf._free) == 1 and buf._free[0] is a
