"""The ``error:`` line of a disk or permission ``OSError`` that names its file (full disk,
file too large, no access, read-only file system, name too long): the path, the reason and
the fix. A file the user chose is fixed with another path; a file of a temporary folder the
command made (``eval --recipe`` measures its artifact there) with ``TMPDIR``.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile

from compactnn.errors import cut

# OSErrors the user fixes (free space, permissions, another path), with the hint to give.
USER_OS_ERRORS = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EDQUOT: "free some of your disk quota or choose another --out",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "that file system is read-only: choose another path",
    errno.EFBIG: "the file outgrew the file-size limit (ulimit -f) or the file system's "
    "largest file: raise the limit or choose another path",
    errno.ENAMETOOLONG: "choose a shorter file or folder name",
}
# The same in a temporary folder the command made (``eval --recipe`` measures its artifact
# there): the user chose no such path, ``TMPDIR`` chooses where it goes.
TEMP_OS_ERRORS = {
    errno.ENOSPC: "free some space there or set TMPDIR to a folder with room",
    errno.EDQUOT: "free some of your disk quota there or set TMPDIR to a folder with room",
    errno.EACCES: "set TMPDIR to a folder you can write",
    errno.EPERM: "set TMPDIR to a folder you can write",
    errno.EROFS: "that file system is read-only: set TMPDIR to a folder you can write",
    errno.EFBIG: "the file outgrew the file-size limit (ulimit -f) or the file system's "
    "largest file: raise the limit or set TMPDIR to another file system",
    errno.ENAMETOOLONG: "set TMPDIR to a folder of a shorter name",
}
# What tempfile names the files and folders it makes: a prefix (compactnn's, or tempfile's
# own ``tmp``) then 8 characters of its alphabet.
_TEMP_NAME = re.compile(r"(compactnn-[a-z-]*|tmp)[a-z0-9_]{8}")


def os_error_message(exc: OSError) -> str:
    """One line for a disk or permission error: the path, the reason, the fix.

    Example:
        >>> os_error_message(OSError(errno.ENOSPC, "No space left on device", "out/m"))
        "'out/m': No space left on device; free some disk space or choose another --out."
    """
    fixes = TEMP_OS_ERRORS if in_temporary_folder(exc.filename) else USER_OS_ERRORS
    return f"{cut(exc.filename)!r}: {exc.strerror}; {fixes[exc.errno]}."


def in_temporary_folder(path: object) -> bool:
    """Whether ``path`` lies in a file or folder that tempfile made in the temporary folder
    (``tempfile.gettempdir()``, ``TMPDIR``): a command's scratch copy, not a path the user
    chose (an ``--out`` under ``/tmp`` is not one).

    Example:
        >>> in_temporary_folder(os.path.join(tempfile.gettempdir(), "tmpab_12xyz", "a"))
        True
        >>> in_temporary_folder(os.path.join(tempfile.gettempdir(), "my-artifact", "a"))
        False
    """
    try:
        top = os.path.abspath(tempfile.gettempdir())
        inner = os.path.relpath(os.path.abspath(os.fsdecode(path)), top)
    except (TypeError, ValueError):  # a file descriptor, another drive
        return False
    first = inner.split(os.sep)[0]
    return not inner.startswith(os.pardir) and bool(_TEMP_NAME.fullmatch(first))
