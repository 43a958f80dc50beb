"""A dangling symbolic link where an output should go is named as one (issue 23), not "a file"."""

from __future__ import annotations

import os

import pytest

from refseg.core.errors import RefsegError
from refseg.core.paths import check_output_path, check_writable


def test_a_dangling_link_is_called_what_it_is(tmp_path):
    link = tmp_path / "out"
    os.symlink(tmp_path / "gone", link)
    with pytest.raises(RefsegError, match=rf"it is a dangling symbolic link \(to {tmp_path / 'gone'}\), not a folder"):
        check_output_path(link, "cache")
    with pytest.raises(RefsegError, match=rf"{link} is a dangling symbolic link \(to {tmp_path / 'gone'}\)"):
        check_output_path(link / "C.zarr", "cache")
    with pytest.raises(RefsegError, match=rf"cannot be created: {link} is a dangling symbolic link"):
        check_writable(link / "run", "--out", directory=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefsegError, match="it is a file, not a folder"):
        check_output_path(tmp_path / "file", "cache")
