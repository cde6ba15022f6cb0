"""Attribute access to a package's submodules, imported on first use: after a plain
``import compactnn`` (whose names load lazily, so that it loads no torch), a documented dotted
path such as ``compactnn.export.artifact.artifact_digest`` or ``compactnn.measure.perplexity``
works as it did when the package imported everything eagerly. Each package's ``__init__``
sets ``__getattr__`` to call :func:`submodule` (PEP 562). Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def submodule(package: str, name: str) -> ModuleType:
    """The submodule ``package.name``, imported on first use; ``AttributeError`` (as for any
    missing attribute) when ``package`` has no such submodule or ``name`` is private.

    Example:
        >>> submodule("compactnn", "errors").__name__
        'compactnn.errors'
    """
    if not name.startswith("_") and name.isidentifier():
        full = f"{package}.{name}"
        if importlib.util.find_spec(full) is not None:
            return importlib.import_module(full)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
