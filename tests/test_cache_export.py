"""HDF5 export and the `refseg-cache` command line."""

import json

import h5py
import numpy as np
import pytest
import zarr
from _cache_util import filled_store, tables
from click.testing import CliRunner

from refseg.cache.cli import main
from refseg.cache.h5export import export_h5
from refseg.cache.layout import FORMAT_VERSION
from refseg.core.errors import CacheError


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path, contents, writer = filled_store(tmp_path_factory.mktemp("cache") / "c.zarr")
    writer.record_bad([writer.index["sent_id"][0]], "test")
    return path, contents


def _zarr_arrays(group, prefix=""):
    for name, node in group.members():
        if isinstance(node, zarr.Group):
            yield from _zarr_arrays(node, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", node


def test_export_h5_round_trip(filled, tmp_path):
    path, contents = filled
    out = tmp_path / "c.h5"
    assert export_h5(path, out) == str(out)
    root = zarr.open_group(str(path), mode="r")
    arrays = dict(_zarr_arrays(root))
    with h5py.File(out, "r") as f:
        names = []
        f.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
        assert sorted(names) == sorted(arrays)
        for name, array in arrays.items():
            if name == "index/text":
                assert list(f[name].asstr()[:]) == tables()[0].text
                continue
            assert f[name].shape == array.shape and f[name].dtype == array.dtype, name
            assert np.array_equal(f[name][:], array[:]), name
        assert np.array_equal(f["t0500/s16"][:], contents[("t", 500)]["s16"])
        assert f["t0500/s16"].chunks == (1, 16, 2, 2)
        assert f["t0500/done"].dtype == bool and f["t0500/done"][:].all()
        # attributes: scalars as they are, the rest as JSON strings
        assert f.attrs["refseg_cache"] == FORMAT_VERSION and f.attrs["shard_size"] == 4
        assert json.loads(f.attrs["extraction"]) == root.attrs["extraction"]
        assert json.loads(f.attrs["spec"]) == root.attrs["spec"]
        assert json.loads(f.attrs["bad"])[0]["reason"] == "test"
        assert f["t0500"].attrs["noise_t"] == 500 and f["t0000"].attrs["timestep"] == 1
    with pytest.raises(CacheError, match="already exists"):
        export_h5(path, out)
    export_h5(path, out, overwrite=True)
    assert not (tmp_path / "c.h5.partial").exists()


def test_cli_info(filled):
    path, _ = filled
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "9 samples" in result.output and "T=500" in result.output and "done 9/9" in result.output
    assert "size on disk" in result.output


def test_cli_export(filled, tmp_path):
    path, contents = filled
    out = tmp_path / "cli.h5"
    result = CliRunner().invoke(main, ["export-h5", str(path), str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["t0000/attn_s32"][:], contents[("t", 0)]["attn_s32"])
    result = CliRunner().invoke(main, ["export-h5", str(path), str(out)])
    assert result.exit_code == 2 and "use --overwrite" in result.output
    assert CliRunner().invoke(main, ["export-h5", "--overwrite", str(path), str(out)]).exit_code == 0


@pytest.mark.parametrize("command", [["info"], ["export-h5"]])
def test_cli_missing_cache_is_one_line_exit_2(tmp_path, command):
    missing = tmp_path / "nope.zarr"
    args = command + [str(missing)] + ([str(tmp_path / "o.h5")] if command == ["export-h5"] else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: cache not found: {missing}"]
    assert not (tmp_path / "o.h5").exists()


def test_cli_not_a_cache(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "x.txt")])
    assert result.exit_code == 2 and "is not a refseg cache" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture
def full_disk(tmp_path):
    """A real, nearly full disk: a 256 KiB tmpfs with 12 KiB left."""
    from _disk_util import small_tmpfs

    with small_tmpfs(tmp_path, "256k", fill_to_kib=256 - 12) as mount:
        yield mount


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk):
    """Refused before writing: exit 2, one line naming ENOSPC and the sizes (it was a segfault with 155
    lines of h5py tracebacks, and a .partial left behind)."""
    import subprocess
    import sys

    store, _, _ = filled_store(tmp_path / "c.zarr")
    out = full_disk / "c.h5"
    done = subprocess.run([sys.executable, "-m", "refseg.cache.cli", "export-h5", str(store), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"error: writing {out} failed: No space left on device (ENOSPC) (the file needs about")
    assert "nothing was kept" in lines[0]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_a_disk_that_fills_during_the_export_is_said_in_one_line(tmp_path, full_disk):
    """Past the space check (as when another job fills the disk meanwhile): HDF5 fails in the child, which
    may crash; this process says ENOSPC and removes the partial file."""
    store, _, _ = filled_store(tmp_path / "c.zarr")
    out = full_disk / "c.h5"
    with pytest.raises(CacheError, match=r"writing .*c\.h5 failed: No space left on device \(ENOSPC\); nothing"):
        export_h5(store, out, space_check=False)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_export_refuses_a_damaged_store_instead_of_copying_zeros(tmp_path):
    store, _, _ = filled_store(tmp_path / "c.zarr")
    (store / "t0500" / "s8" / "c" / "1" / "0" / "0" / "0").unlink()
    result = CliRunner().invoke(main, ["export-h5", str(store), str(tmp_path / "c.h5")])
    assert result.exit_code == 2 and "is damaged: t0500/s8 rows 4..7" in result.stderr, result.output
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()
