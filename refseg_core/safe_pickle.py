"""Load `refs(*).p` files without letting the pickle run code.

A pickle can name any importable callable (``os.system``, ``subprocess.Popen``...) and have the
unpickler call it. The refer files hold only dicts, lists, tuples, str, int, float, bool and None,
which the pickle protocol encodes without naming a single global, so the unpickler here refuses
*every* global: a file that names one is not a refs file, whatever it claims to be.

The real RefCOCO files were written by Python 2 (protocol 2), whose ``str`` is a byte string: it is
loaded as ``bytes`` and then decoded as UTF-8 (falling back to latin-1 for bytes that are not UTF-8),
keys and values alike, at any depth. Python 2 ``unicode`` objects load as ``str`` directly.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

from refseg.core.errors import DataError, UnsafePickleError


class _PlainDataUnpickler(pickle.Unpickler):
    """An Unpickler that accepts no global at all (so no class, function or reducer)."""

    def __init__(self, file: BinaryIO, name: str):
        super().__init__(file, encoding="bytes")
        self._name = name

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's hook
        raise UnsafePickleError(
            f"refusing to unpickle {self._name}: it names the global '{module}.{name}' "
            "(only plain containers and scalars are allowed)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"refusing to unpickle {self._name}: it uses a persistent id "
            "(only plain containers and scalars are allowed)"
        )


def _decode_bytes(value: Any) -> Any:
    """Turn every ``bytes`` (as key or value, at any depth) into ``str``: UTF-8, else latin-1."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin1")
    if isinstance(value, dict):
        return {_decode_bytes(k): _decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_bytes(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode_bytes(v) for v in value)
    return value


def safe_load(fileobj_or_path: str | os.PathLike | BinaryIO) -> Any:
    """Unpickle plain data (containers and scalars) from a path or a binary file object.

    Raises `UnsafePickleError` before anything runs if the pickle names any global, and
    `DataError` (naming the file) if it is missing, truncated or garbled.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        path = Path(fileobj_or_path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"refs file not found: {path}") from None
        except IsADirectoryError:
            raise DataError(f"refs file is a directory, not a pickle: {path}") from None
        except OSError as exc:
            raise DataError(f"cannot read refs file {path}: {exc.strerror or exc}") from None
        name = str(path)
        stream: BinaryIO = io.BytesIO(data)
    else:
        stream = fileobj_or_path
        name = str(getattr(stream, "name", "<pickle stream>"))
    try:
        value = _PlainDataUnpickler(stream, name).load()
    except UnsafePickleError:
        raise
    except RecursionError:
        raise DataError(f"malformed pickle {name}: nested too deeply") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        # Truncated files end in EOFError; garbage raises UnpicklingError/KeyError/ValueError...
        reason = "truncated (unexpected end of file)" if isinstance(exc, EOFError) else f"{type(exc).__name__}: {exc}"
        raise DataError(f"malformed pickle {name}: {reason}") from None
    return _decode_bytes(value)
