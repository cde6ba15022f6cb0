"""One writer at a time in an artifact directory: an advisory lock file held while a save runs.

A save opens ``.compactnn.lock`` in the directory and takes an exclusive ``flock`` on it,
then writes its pid there. The operating system drops the lock when the holder's file is
closed or the process dies (SIGKILL included), so a killed save never blocks the next one:
its lock file is left behind, unlocked, and the next save takes it over. The holder deletes
the file while still holding the lock; a waiter that then gets the lock on the deleted file
sees that the name now points elsewhere (or nowhere) and starts again, so two saves never
both hold "the" lock. ``flock`` locks conflict between separate ``open`` calls, so two
threads of one process exclude each other too; a thread that holds a folder's lock may take
it again (nested ``locked`` blocks: a save inside a caller's own locked block).

Readers (:func:`shared`) take a shared lock on the same file when it exists, so a load waits
for a save in progress to finish and a ``--force`` save waits for the loads that started
before it; a reader never creates the file (artifact folders may be read-only).

Where ``fcntl`` is missing (Windows) saves are not serialised.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from compactnn.errors import CompactnnError, cut

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".compactnn.lock"
_held = threading.local()  # (st_dev, st_ino) of the folders this thread holds locked


class FolderBusyError(CompactnnError):
    """Another save is writing the folder, or committed an artifact there meanwhile: the
    folder is that save's, so a caller that made it must not remove it on this error."""


def holder_pid(root: Path) -> int | None:
    """The pid written in ``root``'s lock file, or None when there is none (yet)."""
    try:
        with open(root / LOCK_NAME, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def busy_error(root: Path) -> FolderBusyError:
    pid = holder_pid(root)
    who = f"another compactnn process (pid {pid})" if pid else "another compactnn process"
    return FolderBusyError(
        f"the folder {cut(str(root))!r} is being written by {who}: wait for it to finish "
        "and rerun with --force (force=True in Python) to replace its artifact, or pick "
        "another output folder."
    )


def _still_named(path: Path, mine: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``mine`` describes (a lock holder deletes its
    lock file as it finishes: a waiter that then gets the lock holds a file no one else sees)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _open_locked(path: Path, wait: bool) -> int | None:
    """An fd of ``path`` holding the lock; None when the name changed under us (retry)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise CompactnnError(
            f"cannot create the lock file {cut(str(path))!r} ({exc.strerror}): make the "
            "output folder writable, or remove what is in the way."
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise busy_error(path.parent) from None
            raise
        if not _still_named(path, os.fstat(fd)):
            os.close(fd)  # the holder before us deleted this file: lock the new one
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


@contextlib.contextmanager
def locked(root: Path, *, wait: bool) -> Iterator[None]:
    """Hold ``root``'s write lock for the body.

    Args:
        root: the artifact directory (it exists).
        wait: block while another save holds the lock; else raise at once.

    Raises:
        FolderBusyError: ``wait`` is false and another save holds the lock.
        CompactnnError: the lock file cannot be created.

    Example:
        >>> with locked(Path("out/cnn-w4a8"), wait=False):  # doctest: +SKIP
        ...     pass
    """
    st = os.stat(root)
    held: set = _held.__dict__.setdefault("folders", set())
    if fcntl is None or (st.st_dev, st.st_ino) in held:  # Windows; or already ours
        yield
        return
    path = root / LOCK_NAME
    fd = None
    while fd is None:
        fd = _open_locked(path, wait)
    held.add((st.st_dev, st.st_ino))
    try:
        yield
    finally:
        held.discard((st.st_dev, st.st_ino))
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: waiters on this file will see the name is gone
        os.close(fd)


def _holds(root: Path) -> bool:
    try:
        st = os.stat(root)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _held.__dict__.get("folders", set())


def _open_shared(path: Path) -> int | bool | None:
    """An fd of ``path`` holding a shared lock; None when there is no usable lock file (read
    unlocked: no save is running, or it is not a regular file); False to retry (the save
    holding it deleted it as it finished)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # absent, a symlink, unreadable: nothing to wait for
        return None
    try:
        mine = os.fstat(fd)
        if not stat.S_ISREG(mine.st_mode):
            os.close(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a save holds it
        if not _still_named(path, mine):
            os.close(fd)
            return False
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


@contextlib.contextmanager
def shared(root: Path) -> Iterator[None]:
    """Read ``root`` while no save writes it: wait for a save in progress, if any, and hold
    off a save that starts meanwhile until the body ends. Creates nothing; a folder without a
    lock file (or on Windows, or one this thread is saving) is read at once.

    Example:
        >>> with shared(Path("out/cnn-w4a8")):  # doctest: +SKIP
        ...     header, blobs = read_files()
    """
    if fcntl is None or not os.path.isdir(root) or _holds(root):
        yield
        return
    fd: int | bool | None = False
    while fd is False:
        fd = _open_shared(root / LOCK_NAME)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def lock_file_exists(root: Path) -> bool:
    """Whether ``root`` has a lock file now: a save is running, or one was killed."""
    return os.path.lexists(root / LOCK_NAME)
