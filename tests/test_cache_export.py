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
