"""The hand-off formats of ``compactnn export``: name -> module with ``can_export`` / ``export``.

Each format module provides ``can_export(qmodel) -> str | None`` (None when the model goes
to that format exactly, else the reason) and ``export(qmodel, out, **opts) -> Path``. The
modules are imported only when a format is used, so a missing optional package (``gguf``,
``compressed-tensors``, ``onnx``) affects only its own format.

Example:
    >>> [f.name for f in FORMATS]
    ['gguf', 'compressed-tensors', 'onnx']
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from compactnn.errors import CompactnnError


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One format: its module and the keyword options its ``export`` takes."""

    name: str
    module: str
    summary: str
    options: tuple[str, ...] = ()


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(
        "gguf",
        "compactnn.export.gguf",
        "llama.cpp GGUF (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks) for Llama-family decoders",
        ("requantize", "tokenizer"),
    ),
    ExportFormat(
        "compressed-tensors",
        "compactnn.export.ctensors",
        "Hugging Face folder with a compressed-tensors quantization_config (transformers, vLLM)",
        ("tokenizer",),
    ),
    ExportFormat(
        "onnx",
        "compactnn.export.onnx_hf",
        "ONNX for transformers models: QDQ int8 or ONNX Runtime MatMulNBits",
        ("example", "accuracy_level", "min_cosine"),
    ),
)
NAMES = tuple(f.name for f in FORMATS)


def get_format(name: str) -> ExportFormat:
    """The format called ``name``.

    Raises:
        CompactnnError: for an unknown name (the known ones are listed).
    """
    for f in FORMATS:
        if f.name == name:
            return f
    raise CompactnnError(f"unknown export format {name!r}; use one of {', '.join(NAMES)}.")


def _module(fmt: ExportFormat):
    try:
        return importlib.import_module(fmt.module)
    except ModuleNotFoundError as exc:
        if exc.name != fmt.module:
            raise  # a missing dependency inside the module: its own message
        raise CompactnnError(
            f"the {fmt.name} export is not available in this installation ({fmt.module} is "
            "missing)."
        ) from exc


def can_export(name: str, model: nn.Module) -> str | None:
    """None when ``model`` goes to format ``name`` exactly, else the reason."""
    fmt = get_format(name)
    try:
        return _module(fmt).can_export(model)
    except CompactnnError as exc:  # a missing package or module is a reason too
        return str(exc)


def capabilities(model: nn.Module) -> dict[str, str | None]:
    """Each format's :func:`can_export` answer for ``model``, in table order."""
    return {f.name: can_export(f.name, model) for f in FORMATS}


def export(name: str, model: nn.Module, out: str | os.PathLike, **opts: Any) -> Path:
    """Export ``model`` to format ``name`` at ``out``; options a format does not take are
    refused rather than ignored (``None`` values are dropped first).

    Raises:
        CompactnnError: unknown format, an option the format does not take, or the format's
            own refusal.
    """
    fmt = get_format(name)
    opts = {k: v for k, v in opts.items() if v is not None and v is not False}
    extra = sorted(set(opts) - set(fmt.options))
    if extra:
        raise CompactnnError(
            f"the {name} export does not take {', '.join(extra)}; "
            f"it takes {', '.join(fmt.options) or 'no options'}."
        )
    return Path(_module(fmt).export(model, out, **opts))
