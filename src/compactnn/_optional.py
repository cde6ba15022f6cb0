"""Optional dependencies: import one, or say which extra to install.

The core install (``pip install compactnn``) compresses, saves and loads models. Hugging Face
models, ONNX export and ONNX Runtime deployment, the demo and the benchmarks need extras;
code that uses one imports it through :func:`require`, so a missing package is a
:class:`~compactnn.errors.CompactnnError` naming the extra, not an ``ImportError`` traceback.
ONNX Runtime imported this way logs errors only (its warnings, such as the coloured telemetry
line of an unwritable HOME, are not printed).

Example:
    >>> require("math", "demo").sqrt(4.0)
    2.0
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

from compactnn.errors import CompactnnError

EXTRAS = ("hf", "onnx", "export", "demo", "bench", "test", "all")
ORT_SEVERITY = 3  # ONNX Runtime's ERROR: its warning (W), info (I), verbose (V) lines are not shown
# an ONNX Runtime log line below error severity, its ANSI colour code first when coloured
_MINOR_ORT_LINE = re.compile(rb"^(?:\x1b\[[0-9;]*m)?[^\n\[]*\[[VIW]:onnxruntime:[^\n]*\n?", re.M)


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
        if module.partition(".")[0] == "onnxruntime" and "onnxruntime" not in sys.modules:
            _import_onnxruntime()
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        raise CompactnnError(
            f"{module!r} is not installed (missing {missing!r}); it comes with the "
            f"{extra!r} extra: pip install 'compactnn[{extra}]'"
        ) from exc


def _import_onnxruntime() -> None:
    """Import ONNX Runtime with its default logger at error severity (errors still print).

    Its extension logs while it loads, before the Python API can lower the severity (1.32
    warns ``Failed to persist telemetry device ID`` in ANSI colour on every run where HOME
    is not writable): what it writes to file descriptor 2 meanwhile is held back and
    replayed without its lines below error severity.
    """
    with _ort_import_output():
        ort = importlib.import_module("onnxruntime")
    ort.set_default_logger_severity(ORT_SEVERITY)


@contextlib.contextmanager
def _ort_import_output() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 inside the block; then write it there
    less ONNX Runtime's warning, info and verbose lines. Without a descriptor 2 or a
    temporary file, the block runs as it is."""
    try:
        _flush_stderr()
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        held = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield
        return
    with held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            _write_fd2(_without_minor_ort_lines(held.read()))


def _without_minor_ort_lines(text: bytes) -> bytes:
    """``text`` without ONNX Runtime's log lines below error severity (``[W:onnxruntime:``,
    ``[I:...``, ``[V:...``); its errors and everything else are kept."""
    return _MINOR_ORT_LINE.sub(b"", text)


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


def _write_fd2(data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(2, view) :]
