"""Optional dependencies: import one, or say which extra to install.

The core install (``pip install compactnn``) compresses, saves and loads models. Hugging Face
models, ONNX export and ONNX Runtime deployment, the demo and the benchmarks need extras;
code that uses one imports it through :func:`require`, so a missing package is a
:class:`~compactnn.errors.CompactnnError` naming the extra, not an ``ImportError`` traceback.

Example:
    >>> require("math", "demo").sqrt(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from types import ModuleType

from compactnn.errors import CompactnnError

EXTRAS = ("hf", "onnx", "export", "demo", "bench", "test", "all")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``; if it (or a package it needs) is missing, name the extra to install.

    Args:
        module: dotted module name, e.g. ``"onnxruntime"`` or ``"matplotlib.pyplot"``.
        extra: the ``compactnn`` extra that installs it (one of :data:`EXTRAS`).

    Returns:
        The imported module.

    Raises:
        CompactnnError: the module is not installed.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; use one of {EXTRAS}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise CompactnnError(
            f"{module!r} is not installed (missing {missing!r}); it comes with the "
            f"{extra!r} extra: pip install 'compactnn[{extra}]'"
        ) from exc
