"""`export_h5(cache, out.h5)`: the same arrays and groups as an HDF5 file, for tools that want one file.

Arrays keep their names, shapes and dtypes (strings become UTF-8 variable-length strings, flags
stay bool); per-sample arrays are chunked one sample per chunk, as in the store. Attributes that are
not scalars (settings dicts, the spec, lists) are stored as sorted JSON strings. The file is written
under a temporary name, by a child process, and renamed at the end, so an interrupted or failed export
leaves no half file.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import sys

import h5py
import numpy as np
import zarr
from tqdm import tqdm

from refseg.cache.reader import open_cache
from refseg.core.errors import CacheError, CacheWriteError, RefsegError

_BLOCK_BYTES = 64 * 2**20  # copy this much at a time


def _h5_attr(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def _copy_attrs(src: dict, dst) -> None:
    for key in sorted(src):
        dst[key] = _h5_attr(src[key])


def _arrays(group: zarr.Group, prefix: str = ""):
    """(path, array) for every array under `group`, depth first, in name order."""
    for name, node in sorted(group.members(), key=lambda m: m[0]):
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Group):
            yield from _arrays(node, path + "/")
        else:
            yield path, node


def _groups(group: zarr.Group, prefix: str = ""):
    for name, node in sorted(group.groups(), key=lambda m: m[0]):
        path = f"{prefix}{name}"
        yield path, node
        yield from _groups(node, path + "/")


def export_h5(cache_path, out_path, overwrite: bool = False, progress: bool = False, space_check: bool = True) -> str:
    """Write the cache at `cache_path` to the HDF5 file `out_path`; returns `out_path`.

    `space_check`: refuse before writing anything when the folder has less free space than the file
    needs (about the store's uncompressed data).

    The file is written by a spawned child process: once a write of HDF5 fails (a full disk), closing
    the file crashes the process in the HDF5 library (a segfault, seen on ENOSPC), so the child reports
    the first error and exits without closing, and this process removes the partial file and says it in
    one line.
    """
    cache_path, out_path = os.fspath(cache_path), os.fspath(out_path)
    open_cache(cache_path)  # refuses what is not a refseg cache, with the usual messages
    if os.path.exists(out_path) and not overwrite:
        raise CacheError(f"{out_path} already exists (use --overwrite to replace it)")
    tmp = out_path + ".partial"
    folder = os.path.dirname(os.path.abspath(out_path))
    need = int(_data_bytes(zarr.open_group(cache_path, mode="r")) * 1.05) + 2**20  # + HDF5's own structures
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
    if space_check and free is not None and free < need:
        raise _export_error(out_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                            f" (the file needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)")
    context = multiprocessing.get_context("spawn")  # zarr's event-loop thread does not survive a fork
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_write_file, args=(cache_path, tmp, progress, send), daemon=True)
    try:
        child.start()
        send.close()
        outcome = receive.recv() if receive.poll(None) else None
    except EOFError:  # the child died before it said anything
        outcome = None
    finally:
        child.join()
        if os.path.exists(tmp) and (outcome is None or outcome[0] != "ok"):
            os.remove(tmp)
    if outcome is None:  # HDF5 crashes on a write it cannot finish: most often the disk filled meanwhile
        if os.path.isdir(folder) and shutil.disk_usage(folder).free < need:
            raise _export_error(out_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        raise CacheError(f"writing {out_path} failed: the export process ended with status {child.exitcode}; "
                         "nothing was kept")
    kind, *detail = outcome
    if kind == "os":
        raise _export_error(out_path, OSError(*detail))
    if kind == "refseg":
        raise CacheError(detail[0])
    os.replace(tmp, out_path)
    return out_path


def _write_file(cache_path: str, tmp: str, progress: bool, send) -> None:
    """In the child: write `tmp`; send ("ok",), ("os", errno, text) or ("refseg", message)."""
    # After a failed write HDF5 prints the same error again from every object h5py frees: the first one
    # is sent to the parent, which says it in one line, and the rest go nowhere. The progress bar keeps
    # the real stderr.
    bar_file = os.fdopen(os.dup(2), "w")
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    sys.unraisablehook = lambda unraisable: None
    cache = open_cache(cache_path)
    root = zarr.open_group(cache_path, mode="r")
    arrays = list(_arrays(root))
    try:
        f = h5py.File(tmp, "w")
        with tqdm(total=_data_bytes(root), unit="B", unit_scale=True, desc="export-h5", disable=not progress,
                  file=bar_file) as bar:
            _copy_attrs(root.attrs.asdict(), f.attrs)
            for path, group in _groups(root):
                _copy_attrs(group.attrs.asdict(), f.require_group(path).attrs)
            for path, array in arrays:
                _copy_array(cache, array, f, path, cache.shard_size, bar)
        f.flush()  # what is still buffered: a full disk may show up only here, and close must not meet it
        f.close()
    except OSError as exc:
        send.send(("os", _errno_of(exc), str(exc)))
        os._exit(1)  # not a normal exit: HDF5 would close the failed file on the way out, and crash
    except RefsegError as exc:
        send.send(("refseg", str(exc)))
        os._exit(1)
    send.send(("ok",))


def _errno_of(exc: OSError) -> int:
    """h5py's write errors carry the OS error in words ("errno = 28, error message = ...")."""
    if exc.errno is not None:
        return exc.errno
    found = re.search(r"errno = (\d+)", str(exc))
    return int(found.group(1)) if found else errno.EIO


def _data_bytes(root: zarr.Group) -> int:
    """The bytes of every array's values (strings counted as one byte each): about the file's size."""
    return sum(int(np.prod(a.shape)) * (a.dtype.itemsize if a.dtype.kind != "T" else 1) for _, a in _arrays(root))


def _export_error(out_path: str, exc: OSError, detail: str = "") -> CacheWriteError:
    code = exc.errno or errno.EIO
    what = f"{os.strerror(code)} ({errno.errorcode.get(code, code)}){detail}"
    err = CacheWriteError(f"writing {out_path} failed: {what}; nothing was kept (the partial file is removed): free "
                          "space or choose another OUT.h5, then run the export again")
    err.errno = code
    return err


def _copy_array(cache, array: zarr.Array, f: h5py.File, path: str, shard_size: int, bar) -> None:
    shape = array.shape
    if array.dtype.kind in "TUO":  # variable-length strings
        values = np.asarray([str(s) for s in array[:]], dtype=object)
        f.create_dataset(path, data=values, dtype=h5py.string_dtype("utf-8"))
        bar.update(len(values))  # counted as one byte each in the total
        _copy_attrs(array.attrs.asdict(), f[path].attrs)
        return
    dtype = np.dtype(array.dtype)
    per_row = array.shards is not None  # the per-sample arrays: one sample per chunk, as in the store
    # a store holds at least one sample and one image (validate_tables), so no axis here is empty
    chunks = (1, *shape[1:]) if per_row else None
    dataset = f.create_dataset(path, shape=shape, dtype=dtype, chunks=chunks)
    # every array of the layout is created with dimension names (layout.create_array, create_flags)
    dataset.attrs["dimension_names"] = json.dumps(list(array.metadata.dimension_names))
    _copy_attrs(array.attrs.asdict(), dataset.attrs)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    block = max(1, _BLOCK_BYTES // row_bytes // shard_size) * shard_size  # whole shards per read
    for start in range(0, shape[0], block):
        stop = min(start + block, shape[0])
        # through the cache's reader: a finished row's lost chunk or bad checksum is an error, not zeros
        dataset[start:stop] = cache.take(array, slice(start, stop))
        bar.update((stop - start) * row_bytes)
