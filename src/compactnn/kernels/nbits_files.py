"""Where :func:`~compactnn.kernels.ort_nbits.to_ort_nbits` writes: the model with its aligned
external data (:func:`save_nbits`), its private folders, and a failed write as one line.

A private folder, ``compactnn-nbits-*``, holds the float ONNX export while it is rewritten
(in the temporary folder, ``TMPDIR``; beside ``path`` where ``to_ort_nbits`` is given one),
and the model itself where no ``path`` is given. It is removed when its model is collected,
at interpreter exit (``sys.exit`` included: a SIGTERM the application turns into an exit, as
the ``compactnn`` command does) and on an error. A process killed outright (SIGKILL, or
SIGTERM with no handler: Python runs nothing then) leaves it; but its process held a lock on
it (``flock``: the kernel drops it when the process dies), so the next private folder made
in the same place first removes every folder no live process holds (:func:`sweep_stale`).

Example:
    >>> folder, lock = private_folder()         # doctest: +SKIP
    >>> release(folder, lock)                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from compactnn._optional import require
from compactnn.errors import CompactnnError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are removed at exit and with their model
    fcntl = None

PREFIX = "compactnn-nbits-"
OWNED = ".owner-lock"  # written once the folder's creator holds its lock: only those are swept
# external-data offsets. ONNX Runtime maps each initializer from the file: on Linux from the
# page below its offset (any offset maps), on Windows only where that page is a multiple of the
# 64 KiB allocation granularity (else it reads a copy). Large tensors, where a copy costs
# memory, start at a multiple of DATA_ALIGN (padding under 6% of each); smaller ones at
# SMALL_ALIGN (64 KiB per tensor made a tiny BERT's data file 1.1 MB, 95% zeros).
DATA_ALIGN = 1 << 16  # a multiple of every page size and mapping granularity
ALIGN_FROM = 1 << 20  # tensors of this many bytes or more start at a multiple of DATA_ALIGN
SMALL_ALIGN = 64  # the others: a cache line, more than any element type or vector load needs

_FREE = "free some space there, "
_WHY = {  # errno: (what happened, the first way out)
    errno.ENOSPC: ("the disk is full", _FREE),
    errno.EDQUOT: ("your disk quota there is used up", _FREE),
    errno.EFBIG: ("a file would pass the file-size limit", "raise it (ulimit -f), "),
    errno.EACCES: ("the folder is not writable", ""),
    errno.EPERM: ("the folder is not writable", ""),
    errno.EROFS: ("the folder is on a read-only file system", ""),
}


def disk_error(exc: OSError, folder: str | os.PathLike, own: bool) -> CompactnnError | None:
    """``exc``, a failed write into ``folder``, as a one-line error naming the folder and the
    ways out; ``own``: the temporary folder (``TMPDIR``), else the folder of the user's
    ``path``. None for an error that is not about the disk (re-raise it as it is).

    Example:
        >>> err = OSError(errno.ENOSPC, "No space left on device")
        >>> print(disk_error(err, "/tmp", own=False))  # doctest: +ELLIPSIS
        to_ort_nbits: cannot write the ONNX model into /tmp (No space left on device): the ...
    """
    if exc.errno not in _WHY:
        return None
    why, first = _WHY[exc.errno]
    where = f"the temporary folder {folder}" if own else str(folder)
    fix = (
        f"{first}set TMPDIR to a folder with room that you can write (before Python starts), "
        "or pass to_ort_nbits path=<a file there>: the model and its scratch files go beside it"
        if own
        else f"{first}or pass to_ort_nbits another path= (a folder with room that you can write)"
    )
    return CompactnnError(
        f"to_ort_nbits: cannot write the ONNX model into {where} ({exc.strerror or exc}): "
        f"{why}; {fix}"
    )


def reraise_disk_error(exc: OSError, folder: str | os.PathLike, own: bool) -> NoReturn:
    """Raise :func:`disk_error`'s message from ``exc``, or ``exc`` itself when it is not
    about the disk."""
    err = disk_error(exc, folder, own)
    if err is None:
        raise exc
    raise err from exc


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the private folders in ``root`` (default: the temporary folder) whose process
    died without removing them (no live process holds their lock); returns them. Folders of
    other users, of live processes, or that hold no lock marker are left alone."""
    if fcntl is None:
        return []
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            if not (folder / OWNED).is_file():
                continue
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # another user's folder, or gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process runs
            os.close(fd)
            continue
        try:
            if (folder / OWNED).is_file():  # not removed by another sweep meanwhile
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


def private_folder(root: str | os.PathLike | None = None) -> tuple[Path, int | None]:
    """A new folder ``compactnn-nbits-*`` in ``root`` (default: the temporary folder) and the
    descriptor that holds its lock until :func:`release` (None where no lock could be taken:
    the folder is then never swept by another process). Stale folders there go first."""
    sweep_stale(root)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    if fcntl is None:
        return folder, None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (folder / OWNED).touch()  # only now: a sweep never sees an unlocked marked folder
    except OSError:
        os.close(fd)
        return folder, None
    return folder, fd


def own_folder() -> tuple[Path, int | None]:
    """:func:`private_folder` in the temporary folder for a model of its own; a disk error
    as :func:`disk_error`'s message."""
    try:
        return private_folder()
    except OSError as exc:
        reraise_disk_error(exc, tempfile.gettempdir(), True)


def release(folder: str | os.PathLike, lock: int | None) -> None:
    """Remove ``folder`` and then drop its lock (a sweep never sees it half removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    if lock is not None:
        with contextlib.suppress(OSError):
            os.close(lock)


@contextlib.contextmanager
def scratch_folder(root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private folder for the duration of the block, removed after it; a disk error inside
    it becomes :func:`disk_error`'s message (``TMPDIR`` as the way out where ``root`` is
    None, else another ``path``)."""
    try:
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        folder, lock = private_folder(root)
    except OSError as exc:
        reraise_disk_error(exc, root or tempfile.gettempdir(), root is None)
    try:
        yield folder
    except OSError as exc:
        reraise_disk_error(exc, folder.parent, root is None)
    finally:
        release(folder, lock)


def save_nbits(proto: Any, path: str | os.PathLike, min_bytes: int = 1024) -> int:
    """Write ``proto`` to ``path`` with every initializer of ``min_bytes`` or more in
    ``<path>.data``, each of ``ALIGN_FROM`` bytes or more at an offset that is a multiple of
    ``DATA_ALIGN`` (so ONNX Runtime maps it from the file instead of copying it, on every
    platform), smaller ones at a multiple of ``SMALL_ALIGN``. Both files are replaced atomically;
    ``proto`` is not modified; a missing parent folder is created. Returns the bytes written
    (both files)."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    if path.is_dir():
        raise CompactnnError(
            f"path {path} is a folder; give the model file's name, e.g. {path / 'model.onnx'}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    tmp_data = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    tmp_model = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_data, "wb") as f:
            for t in out.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < min_bytes:
                    continue
                align = DATA_ALIGN if len(t.raw_data) >= ALIGN_FROM else SMALL_ALIGN
                offset = -f.tell() % align + f.tell()
                f.write(b"\0" * (offset - f.tell()))
                f.write(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", data_path.name), ("offset", offset)):
                    t.external_data.add(key=key, value=str(value))
                t.external_data.add(key="length", value=str(f.tell() - offset))
            f.flush()
            os.fsync(f.fileno())
        tmp_model.write_bytes(out.SerializeToString())
        os.replace(tmp_data, data_path)
        os.replace(tmp_model, path)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_model.unlink(missing_ok=True)
    return path.stat().st_size + data_path.stat().st_size
