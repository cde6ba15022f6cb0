"""Crash-safe file writing (temporary file + rename, fsync) and safe reading of regular files."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from compactnn.errors import ArtifactError, CompactnnError, cut

# A file is written as ``.<name>.<8 random>.tmp`` first, a folder as ``.<name>.<8>.cnn-tmp``:
# that much longer than the name, on top of the file system's limit.
TMP_NAME_ROOM = 20
# An artifact folder's own files (``model.safetensors``, ``.cnn-<token>-...`` while saving).
INNER_PATH_ROOM = 64
# Kernel file systems: a write there fails late (sysfs) or replaces a device node (/dev).
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
USER_DIRS = ("/dev/shm",)  # a plain tmpfs under /dev, where anyone may write


def names_folder(out: str | os.PathLike) -> bool:
    """Whether ``out`` ends with a path separator: the user means a folder (``Path`` drops it)."""
    text = os.fspath(out)
    return text.endswith(os.sep) or bool(os.altsep and text.endswith(os.altsep))


def force_option(what: str) -> str:
    """How the caller who named an output ``what`` asks to replace it: ``--force`` on the
    command line (``what`` is an option such as ``"--out"``), else ``force=True``.

    Example:
        >>> force_option("--out"), force_option("path")
        ('--force', 'force=True')
    """
    return "--force" if what.startswith("--") else "force=True"


def system_folder(path: str | os.PathLike) -> str | None:
    """The system folder (``/proc``, ``/sys``, ``/dev`` but not ``/dev/shm``) that ``path``,
    links resolved, lies under; None for a path of the user's own.

    Example:
        >>> system_folder("/sys/x.onnx"), system_folder("/dev/shm/x.onnx")
        ('/sys', None)
    """
    real = os.path.realpath(path)

    def under(folder: str) -> bool:
        return real == folder or real.startswith(folder + "/")

    if any(under(user) for user in USER_DIRS):
        return None
    return next((system for system in SYSTEM_DIRS if under(system)), None)


def check_file_path(
    path: str | os.PathLike, what: str, force: bool | None = None, suggest: str = "out.bin"
) -> Path:
    """Refuse, before any slow work, a file path :func:`atomic_write` could not use.

    Args:
        path: the file to write later (missing parent folders are fine: they are created).
        what: how the user named it, for the message (``"--json"``, ``"path"``): an
            option (``--...``) is told to pass ``--force``, a Python argument ``force=True``.
        force: None writes over an existing file; False refuses one (True replaces it).
        suggest: a file name the message offers inside a folder given by mistake.

    Raises:
        CompactnnError: ``path`` is or names a folder, lies under a system folder (``/sys``,
            ``/proc``, ``/dev``), a part of its folder path is a file, the nearest existing
            folder is not writable, or it exists and ``force`` is False.

    Example:
        >>> check_file_path("out/report.json", "--json")  # doctest: +SKIP
    """
    check_path_length(path, f"{what} {cut(path)!r}")
    if (system := system_folder(path)) is not None:  # root may "write" there, until it fails
        raise CompactnnError(
            f"{what} {str(path)!r} lies under {system}, a system folder: choose a file in a "
            f"directory of your own, such as {suggest!r}."
        )
    out = Path(path)
    if names_folder(path) or out.is_dir():
        raise CompactnnError(
            f"{what} {str(path)!r} is a folder, and a file is written there: give a file path "
            f"such as {str(out / suggest)!r}."
        )
    if os.path.lexists(out) and force is False:
        raise CompactnnError(
            f"{what} {str(path)!r} exists; pass {force_option(what)} to replace it."
        )
    writable_folder(out.absolute().parent, f"{what} {str(path)!r}")
    return out


def check_path_length(path: str | os.PathLike, label: str, room: int = 0) -> None:
    """Refuse, before any work, a path the file system cannot hold (``ENAMETOOLONG``): a
    folder or file name over the file system's limit (the last one less
    :data:`TMP_NAME_ROOM`, for the temporary name written first), or a full path over the
    system's, ``room`` bytes kept for the files an output folder gets. ``label`` names the
    output in the message (its path already cut).

    Example:
        >>> check_path_length("out/model.json", "--json 'out/model.json'")  # fine: no error
    """
    full = os.path.abspath(path)
    existing = full
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # no such limit on this system: the POSIX usual
        name_max, path_max = 255, 4096
    parts = Path(full).parts[1:]
    for i, part in enumerate(parts):
        limit = name_max - (TMP_NAME_ROOM if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            raise CompactnnError(
                f"{label}: the name {cut(part, 40)!r} is {len(os.fsencode(part))} bytes, "
                f"longer than this file system allows ({limit}); choose a shorter name."
            )
    size = len(os.fsencode(full)) + TMP_NAME_ROOM + room
    if size >= path_max:
        raise CompactnnError(
            f"{label} is {len(os.fsencode(full))} bytes long as a full path, longer than this "
            f"system allows ({path_max - 1 - TMP_NAME_ROOM - room}); choose a shorter path."
        )


def writable_folder(path: Path, label: str) -> Path:
    """The nearest existing folder on ``path`` (``path`` itself when it exists), where the
    missing folders below it can be created; ``label`` names the output in the messages.

    Raises:
        CompactnnError: that nearest existing path is a file, or the folder is not writable.
    """
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise CompactnnError(
            f"cannot create {label}: {str(existing)!r} on its path is a file (it is not a "
            "directory)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CompactnnError(
            f"cannot write {label}: {str(existing)!r} is not writable; choose another path."
        )
    return existing


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``; never leaves a partial file.

    Missing parent folders are created; the file gets the mode a plain ``open()`` would give
    (``0o666`` less the umask), whatever ``write`` did to the temporary file.

    Raises:
        CompactnnError: ``path`` is a folder, or a parent of it is a file.
        OSError: the write failed (a full disk); one without a filename is given ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise CompactnnError(f"{str(path)!r} is a folder: give a file path to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CompactnnError(
            f"cannot create {str(path)!r}: a part of its folder path is a file."
        ) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a folder refusing new files: the user's path, not the temp name
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and writers that replace tmp) use 0o600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc  # not the tmp name
        if isinstance(exc, Exception) and (named := write_error(exc, path)) is not exc:
            raise named from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the file system has no such call."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` on a fresh temporary sibling of ``folder``, fsync what it
    wrote, then put it in ``folder``'s place: readers see the old folder or the new one,
    never a mix or a half-written one, and nothing of the old folder is kept.

    An existing ``folder`` (the caller has checked it may be replaced) is swapped in one step
    where the system allows (Linux), else renamed aside first; the old copy is then deleted.
    A failed ``write`` removes the temporary folder and leaves ``folder`` as it was. Leftovers
    of a killed run (``.<name>.*.cnn-tmp`` beside it) are removed by the next one.

    Returns:
        ``folder`` as a ``Path``.
    """
    given = Path(folder)
    folder = Path(os.path.realpath(given))  # a link to a folder: its target is replaced
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{folder.name}.*.cnn-tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".cnn-tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0o700; a plain mkdir would not
        try:
            write(tmp)
        except OSError as exc:  # a file of the temporary folder: named as in ``given``
            inside = exc.filename is not None and Path(exc.filename).is_relative_to(tmp)
            if not inside or exc.errno is None:
                raise
            where = given / Path(exc.filename).relative_to(tmp)
            raise OSError(exc.errno, exc.strerror, os.fspath(where)) from exc
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
        if folder.is_dir() and any(folder.iterdir()) and _exchange(tmp, folder):
            pass  # tmp now holds the old folder
        elif folder.is_dir() and any(folder.iterdir()):
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".cnn-tmp", dir=parent))
            os.replace(folder, aside)  # onto an empty folder: allowed
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(aside, folder)
                raise
            tmp = aside
        else:
            os.replace(tmp, folder)  # a missing or empty folder
        fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return given


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hf_weights_file(path: str | os.PathLike) -> Path | None:
    """The file whose digest identifies a Hugging Face directory's weights, if any:
    ``model.safetensors``, else the shard index ``model.safetensors.index.json``, else
    ``pytorch_model.bin``."""
    folder = Path(path)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and deletions inside ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_new(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create ``path`` (which must not exist) with ``write(path)`` and fsync it.

    For files under fresh names: no rename needed. A failed write removes the file; an
    OSError without a filename (a full disk during ``f.write``) is given ``path``.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        os.close(fd)
        write(str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, Exception) and (named := write_error(exc, path)) is not exc:
            raise named from exc
        raise


def naming(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` itself when it names a file, else the same error naming ``path`` (a write,
    ``f.write`` or ``fsync``, that fails on a full disk raises an OSError without a filename).

    Example:
        >>> naming(OSError(28, "No space left on device"), "out/m.bin").filename
        'out/m.bin'
    """
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


# numpy's ``tofile`` (the gguf writer's) on a short ``fwrite``: no errno, no filename
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")
# the Rust io::Error in a writer's message (safetensors' SafetensorError), debug-printed
# ("Os { code: 28, ...") or displayed ("File too large (os error 27)")
_OS_CODE = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


def _size_limited() -> bool:
    """Whether this process has a file-size limit (``ulimit -f``), which cuts writes short."""
    try:
        import resource
    except ImportError:  # not on this system
        return False
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


def write_error(exc: Exception, path: str | os.PathLike) -> Exception:
    """The OSError naming ``path`` that a failed write of ``path`` means, else ``exc`` itself.

    A writer's OSError without a filename (``f.write`` or ``fsync`` on a full disk) is given
    ``path`` (:func:`naming`); numpy's short write (``OSError("4352 requested and 608
    written")``, no errno) is a full disk (or the file-size limit, when the process has one:
    ``ulimit -f``); a library error carrying an OS error code in its
    message (safetensors' ``SafetensorError ... Os { code: 28, ...``) is that OSError.

    Example:
        >>> write_error(OSError("4352 requested and 608 written"), "m.gguf").strerror
        'No space left on device (608 of 4352 bytes written)'
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return naming(exc, path)
    text = str(exc)
    if isinstance(exc, OSError) and (short := _SHORT_WRITE.search(text)):
        want, done = short.groups()
        code = errno.EFBIG if _size_limited() else errno.ENOSPC  # the C errno is lost
        why = f"{os.strerror(code)} ({done} of {want} bytes written)"
        return OSError(code, why, os.fspath(path))
    if isinstance(exc, CompactnnError):  # already the user's one line
        return exc
    if (found := _OS_CODE.search(text)) is not None:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code), os.fspath(path))
    return exc


def read_regular(path: str | os.PathLike, size: int | None, limit: int | None = None) -> bytes:
    """All bytes of a regular file, refusing symlinks, devices, FIFOs and sockets.

    ``os.lstat`` is checked before opening (no link is followed, no special file opened), the
    size is checked against ``size`` (the size the header records) or ``limit`` before
    anything is read, and the open descriptor is checked again, so the bytes returned are
    exactly those of the file the checks saw.

    Raises:
        ArtifactError: the file is missing, special, of the wrong size, or unreadable.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} is missing; re-save the artifact.") from exc
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(
            f"{path} is not a regular file (a symlink, device or special file): an artifact "
            "holds plain files only; copy the real file in its place or re-save."
        )
    if size is not None and st.st_size != size:
        raise ArtifactError(
            f"{path} is truncated or replaced: {st.st_size} bytes, the header says {size}."
        )
    if limit is not None and st.st_size > limit:
        raise ArtifactError(f"{path} is {st.st_size} bytes, more than {limit} allowed.")
    flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                raise ArtifactError(f"{path} was replaced while being read; try again.")
            chunks, left = [], st.st_size + 1  # one byte more: a file that grew is caught
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from exc
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise ArtifactError(f"{path} changed size while being read; try again.")
    return data
