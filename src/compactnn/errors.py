"""The one exception type compactnn raises for user mistakes.

The CLI catches it and prints its message without a traceback; library users can catch it
to tell a bad input from a bug. Also what messages share: short quotes of long values
(:func:`cut`) and where a warning points (:func:`user_stacklevel`).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path


class CompactnnError(ValueError):
    """A user-facing error: the message names the bad input and how to fix it."""


class ArtifactError(CompactnnError):
    """A saved artifact is missing, truncated, tampered with, or of an unknown format."""


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
