"""Errors a user can cause. Every CLI turns a `RefsegError` into one line on stderr and exit 2.

Raise the most specific subclass, with a message that names the file, sample or setting at fault;
the message is printed as is, so it must read well on its own.
"""


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


class CacheMismatchError(CacheError):
    """A store exists with a different fingerprint (backbone, extraction settings or dataset)."""


class NonFiniteError(RefsegError):
    """A NaN/inf feature was produced; it is never stored."""


class RunError(RefsegError):
    """A head run directory is missing, malformed or from a different head."""
