"""Importing a module the user named (a MODEL factory ``pkg.mod:build``, a ``--plugin``)
from the folder they run in, without leaving that folder in front of installed packages."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def user_folder_importable() -> Iterator[None]:
    """The current folder first on ``sys.path`` while a module the user named is imported,
    then last: their own sibling modules still import, but a ``numpy.py`` or ``onnx.py``
    lying in that folder never shadows an installed package that compactnn imports later
    (the folder stayed first on ``sys.path`` before session 30).

    Example:
        >>> with user_folder_importable():
        ...     first = sys.path[0]
        >>> first == str(Path.cwd()) and sys.path[-1] == first
        True
    """
    here = str(Path.cwd())
    sys.path.insert(0, here)
    try:
        yield
    finally:
        sys.path.remove(here)  # the first occurrence: ours
        if here not in sys.path:
            sys.path.append(here)
