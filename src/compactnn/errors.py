"""The one exception type compactnn raises for user mistakes.

The CLI catches it and prints its message without a traceback; library users can catch it
to tell a bad input from a bug. Also what messages share: short quotes of long values
(:func:`cut`) and where a warning points (:func:`user_stacklevel`).
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import types
from pathlib import Path


class CompactnnError(ValueError):
    """A user-facing error: the message names the bad input and how to fix it."""


class ArtifactError(CompactnnError):
    """A saved artifact is missing, truncated, tampered with, or of an unknown format."""


# How torch's CPU allocator fails (c10's alloc_cpu.cpp; "not enough memory" where it has no
# posix_memalign), and how torch's mmap of a file (``UntypedStorage.from_file``, which
# safetensors' ``load_file`` uses) fails for lack of address space.
ALLOCATOR_FAILURES = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)
MMAP_FAILURE = ("unable to mmap", "Cannot allocate memory (12)")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the process ran out of memory, not a bug: a ``MemoryError``
    (numpy's ``_ArrayMemoryError`` is one), an ``OSError`` ENOMEM, or torch's CPU allocator
    (or its mmap of a file) failing, matched by its exact words; any other error is not.

    Example:
        >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
        ...     "tried to allocate 64 bytes. Error code 12 (Cannot allocate memory)"))
        True
        >>> is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
        False
        >>> is_out_of_memory(Exception("[ONNXRuntimeError] : 6 : std::bad_alloc"))
        True
    """
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    text = str(exc)
    if "std::bad_alloc" in text:  # C++ runtimes' (ONNX Runtime's RuntimeException) words
        return True
    return isinstance(exc, RuntimeError) and (
        any(words in text for words in ALLOCATOR_FAILURES)
        or all(words in text for words in MMAP_FAILURE)
    )


def name_list(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, with ``", ..."`` when there are more."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def counted(n: int, noun: str) -> str:
    """``"1 layer"``, ``"3 layers"``: a count and its noun for a message."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type's name when empty), at most ``limit``
    characters: the part of a library's error worth quoting in a one-line message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def cut(text: object, limit: int = 200) -> str:
    """``str(text)``, cut to ``limit`` characters with how many were left out: a value from a
    file or the command line quoted in a message stays one short line.

    Example:
        >>> cut("x" * 300, 10)
        'xxxxxxxxxx... (290 more characters)'
    """
    text = str(text)
    return (
        text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
    )


_PACKAGE = str(Path(__file__).resolve().parent)  # .../compactnn


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller point at the first
    frame outside the compactnn package (what Python 3.12's ``skip_file_prefixes`` does;
    3.11 has no such argument). The ``__init__`` that ``dataclass`` generates (file
    ``"<string>"``) and ``dataclasses.replace`` are skipped too, so a warning from a config's
    ``__post_init__`` names the user's line that built the config."""
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame.f_back is not None and _skipped(frame.f_code):
        frame, level = frame.f_back, level + 1
    return level


def _skipped(code: types.CodeType) -> bool:
    return (
        _in_package(code.co_filename)
        or (code.co_filename, code.co_name) == ("<string>", "__init__")
        or code.co_filename == dataclasses.__file__
    )


def _in_package(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):  # "<string>" and the like
        return False
