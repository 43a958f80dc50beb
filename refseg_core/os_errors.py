"""OS errors said in the user's terms: a bad path (choose another) apart from a disk's state (free space, repair).

A bad path or a missing permission is fixed by choosing another path; a full or failing disk by
freeing space or repairing it. The errno says which, and the advice must match it.
"""

from __future__ import annotations

import errno

PATH_ERRNOS = {
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EEXIST: "it exists already",
}


def is_path_error(exc: OSError) -> bool:
    """Whether `exc` comes from the path itself (bad, forbidden, read-only), not from the disk's state."""
    return exc.errno in PATH_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """`exc` in one line: its cause in words, its errno name, the file it names."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    cause = PATH_ERRNOS.get(exc.errno) or " ".join(str(exc.strerror or exc).split())
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{cause}{' [' + code + ']' if code else ''}{where}"
