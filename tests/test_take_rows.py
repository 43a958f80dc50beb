"""take_rows reads any list of rows (unordered, repeated, gapped) as slices, with the same result."""

import numpy as np
import zarr

from refseg.cache.store import take_rows


def test_take_rows_matches_fancy_indexing(tmp_path):
    data = np.arange(20 * 3, dtype=np.int32).reshape(20, 3)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 3), dtype=data.dtype)
    arr[:] = data
    for rows in ([5], [3, 4, 5, 9, 10, 0], [7, 7, 2, 19], list(range(20))[::-1]):
        assert np.array_equal(take_rows(arr, rows), data[rows])
    assert take_rows(arr, []).shape == (0, 3)
    assert np.array_equal(take_rows(arr, slice(2, 6)), data[2:6])
