"""Writing a verified QDQ ONNX file (``export.onnx.export_onnx`` and
``DeployedModel.export_onnx``): where it may go, and what it is said to hold.

``force=True`` replaces only an earlier ONNX export, the rule of ``compactnn export``
(:func:`~compactnn.export.formats.check_replaceable`): a checkpoint or a notes file at the
path is refused, ``force`` or not. A model whose output is the same for every sample of the
example while its float form's varies gets the one-line collapse warning that deploy and
eval give (:func:`~compactnn.core.collapse.collapse_note`): a file that agrees with such
a model proves nothing.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from compactnn.core.collapse import CollapseWarning, collapse_on
from compactnn.core.float_twin import float_model
from compactnn.errors import user_stacklevel
from compactnn.export.formats import check_replaceable
from compactnn.export.fs import atomic_write, check_file_path


def check_onnx_path(path: str | os.PathLike, force: bool) -> None:
    """Refuse, before any work, a ``path`` an ONNX file cannot be written to: a folder, an
    existing file without ``force``, and with it anything but an earlier ONNX export.

    Raises:
        CompactnnError: one line naming ``path`` and the fix.

    Example:
        >>> check_onnx_path("new/model.onnx", force=True)  # nothing there: nothing to refuse
    """
    check_file_path(path, "path", force=force, suggest="model.onnx")
    if force:
        check_replaceable("onnx", path, "path")


def write_onnx(path: str | os.PathLike, data: bytes) -> None:
    """Write the serialized model ``data`` to ``path`` atomically (parent folders made)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def collapse_line(qmodel: nn.Module, example: Any, step: float | None) -> str | None:
    """The collapse warning for ``qmodel`` on ``example`` (``step``: its output grid), with
    its float form (every quantizer off, the dequantized weights:
    ``core.float_twin.float_model``) as the reference; None when it did not collapse
    or its output is not a tensor."""
    was_training = qmodel.training
    qmodel.eval()
    try:
        return collapse_on(float_model(qmodel), qmodel, example, step)
    finally:
        qmodel.train(was_training)


def warn_if_collapsed(qmodel: nn.Module, example: Any, step: float | None) -> None:
    """Warn (``CollapseWarning``) with :func:`collapse_line` when ``qmodel`` collapsed."""
    if (line := collapse_line(qmodel, example, step)) is not None:
        warnings.warn(line, CollapseWarning, stacklevel=user_stacklevel())
