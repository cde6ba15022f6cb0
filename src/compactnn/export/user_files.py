"""Reading the files of a folder the user hands in (a Hugging Face model folder's JSON and
weight shards) without hanging or crashing on hostile ones: regular files only (a link to
one is fine: the Hugging Face cache links its snapshots to blobs), never a FIFO (opening one
blocks until someone writes to it) or a device, and JSON read as one object with a one-line
:class:`~compactnn.errors.CompactnnError` for anything else.

Example:
    >>> special_kind("no-such-file") is None
    True
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is not a regular file (``"a FIFO"``, ``"a
    device"``, ``"a link to a device"``, ``"a broken link"``...); None for a regular file
    (or a link to one) and for a missing path. Nothing is opened: only ``stat`` is called.

    Example:
        >>> special_kind("/dev/null")
        'a device'
    """
    try:
        lst = os.lstat(path)
    except OSError:
        return None  # missing (or an unreadable folder: the caller's own error says so)
    link = stat.S_ISLNK(lst.st_mode)
    try:
        st = os.stat(path) if link else lst
    except OSError:
        return "a broken link"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
    return f"a link to {kind}" if link else kind


def not_regular(path: str | os.PathLike, what: str = "") -> str:
    """The message part that says ``path`` (of kind :func:`special_kind`) is not a regular
    file: ``"'m/model.safetensors' is not a regular file (a FIFO)"``."""
    kind = special_kind(path) or "missing"
    return f"{what}{str(path)!r} is not a regular file ({kind})"


def check_regular(path: str | os.PathLike, fix: str) -> None:
    """Refuse ``path`` unless it is a regular file (or a link to one), before anything opens
    it; ``fix`` ends the message (what the user should do).

    Raises:
        CompactnnError: ``path`` is missing, a FIFO, a device, a folder, a link to one of
            these, or a broken link.
    """
    if not os.path.lexists(path):
        raise CompactnnError(f"{str(path)!r} does not exist: {fix}")
    if special_kind(path) is not None:
        raise CompactnnError(f"{not_regular(path)}: {fix}")


def read_regular_bytes(path: str | os.PathLike, fix: str) -> bytes:
    """All bytes of the regular file ``path`` (links followed), checked with ``stat`` before
    it is opened and opened without blocking (``O_NONBLOCK``: a FIFO swapped in after the
    check is refused, not waited on).

    Raises:
        CompactnnError: as :func:`check_regular`, or the file cannot be read.
    """
    check_regular(path, fix)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CompactnnError(f"{not_regular(path)}: {fix}")
            return f.read()
    except OSError as exc:
        raise CompactnnError(f"cannot read {str(path)!r}: {exc.strerror or exc}; {fix}") from exc


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The JSON object in the regular file ``path``; ``fix`` ends every message.

    Raises:
        CompactnnError: ``path`` is not a readable regular file, not UTF-8 JSON, nested
            deeper than Python's parser follows, or holds something other than an object.

    Example:
        >>> read_json_object("no-such.json", "save it again.")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: 'no-such.json' does not exist: save it again.
    """
    data = read_regular_bytes(path, fix)
    try:
        value = json.loads(data)
    except RecursionError as exc:
        raise CompactnnError(
            f"{str(path)!r} nests its JSON deeper than Python's parser follows: {fix}"
        ) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CompactnnError(f"{str(path)!r} is not valid JSON ({why}): {fix}") from exc
    if not isinstance(value, dict):
        raise CompactnnError(
            f"{str(path)!r} holds a JSON {_json_kind(value)}, not an object: {fix}"
        )
    return value


def _json_kind(value: Any) -> str:
    """``"array"``, ``"string"``, ``"number"``...: JSON's name for a parsed value's type."""
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def index_weight_map(index: Path, fix: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors shard index
    (``model.safetensors.index.json``): an object whose values are plain file names in the
    index's folder.

    Raises:
        CompactnnError: as :func:`read_json_object`, or ``weight_map`` is missing, not an
            object, or names a shard by a path (``../x``, ``sub/x``) or not by a string.
    """
    body = read_json_object(index, fix)
    weight_map = body.get("weight_map")
    if not isinstance(weight_map, dict):
        kind = "missing" if weight_map is None else f"a JSON {_json_kind(weight_map)}"
        raise CompactnnError(
            f"{str(index)!r}: its weight_map is {kind}, not an object of tensor name -> shard "
            f"file: {fix}"
        )
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file or file == "..":
            raise CompactnnError(
                f"{str(index)!r}: tensor {name[:80]!r} names a bad shard {str(file)[:80]!r} "
                f"(a shard is a file name in the index's folder): {fix}"
            )
    return dict(weight_map)
