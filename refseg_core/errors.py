"""Errors a user can cause. Every CLI turns a `RefsegError` into one line on stderr and exit 2.

Raise the most specific subclass, with a message that names the file, sample or setting at fault;
the message is printed as is, so it must read well on its own.
"""

import errno
import os


class RefsegError(Exception):
    """Base class: something about the user's input, files or flags is wrong (exit 2, no traceback)."""


class DataError(RefsegError):
    """A dataset file is missing, malformed or inconsistent (refs pickle, instances.json, images)."""


class UnsafePickleError(DataError):
    """A pickle names a global outside the allow-list: refused before anything is executed."""


class ModelError(RefsegError):
    """Backbone weights cannot be found or loaded."""


class CacheError(RefsegError):
    """A cache store is missing, incompatible, from a newer format, or lacks what was asked for."""


class CacheNotFoundError(CacheError):
    """No store at the path."""


class IncompleteCacheError(CacheError):
    """The store's creation was interrupted before it was finished."""


class NewerFormatError(CacheError):
    """The store was written by a newer refseg, in a format this one does not know."""


class CacheMismatchError(CacheError):
    """A store exists with a different fingerprint (backbone, extraction settings or dataset)."""


class DamagedCacheError(CacheError):
    """Data a store says it holds cannot be read back as written: a chunk file that is missing, a
    checksum that does not match, a core array without its metadata.

    `array` is the array's path in the store ("t0005/s8"), `rows` the rows found damaged, `detail`
    what is wrong with them; the store's reader rewrites the message with their sample ids.
    """

    def __init__(self, message: str, array: str | None = None, rows=(), detail: str | None = None,
                 missing: bool = False):
        super().__init__(message)
        self.array = array
        self.rows = [int(r) for r in rows]
        self.detail = detail or message
        self.missing = missing  # absent (never written, or lost) rather than corrupt


class CacheWriteError(CacheError, OSError):
    """Writing the store failed (a full disk, an I/O error): one line that says what to do next.

    Both a `CacheError` (CLIs print it and exit 2) and an `OSError` (what callers catching I/O
    errors expect); `errno` is that of the original error.
    """

    @classmethod
    def from_os_error(cls, path: str, exc: OSError) -> "CacheWriteError":
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        what = " ".join(str(exc.strerror or exc).split()) + (f" ({code})" if code else "")
        where = f" at {exc.filename}" if exc.filename else ""
        err = cls(f"writing cache {path} failed: {what}{where}; the shards finished before are kept and valid: "
                  "free space or fix the disk, then rerun the same command to resume")
        err.errno = exc.errno
        return err


class NonFiniteError(RefsegError):
    """A NaN/inf feature was produced; it is never stored."""


class RunError(RefsegError):
    """A head run directory is missing, malformed or from a different head."""


class RunWriteError(RunError, OSError):
    """Writing a head run directory failed (a full disk, an I/O error); what it held before is intact."""

    @classmethod
    def from_os_error(cls, run, path, code: int) -> "RunWriteError":
        name = errno.errorcode.get(code, str(code))
        err = cls(f"writing run {run} failed: {os.strerror(code)} ({name}) at {path}; the epochs completed before "
                  "are kept: free space, then rerun the same command with --resume")
        err.errno = code
        return err
