"""Sizes: bytes on disk of an artifact's model, bytes a recipe implies, and each layer's format.

Example:
    >>> from torch import nn
    >>> layer_formats(nn.Sequential(nn.Linear(4, 2)))
    {'0': 'float32'}
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from compactnn.core.modules import weight_layers
from compactnn.core.qlayers import has_integer_weight
from compactnn.errors import CompactnnError
from compactnn.export.artifact import COMPANIONS, info_of, pack_state
from compactnn.export.size import artifact_size
from compactnn.export.sparse import sparsify


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the model an artifact directory holds: every file in it (as
    ``os.stat`` reports) but its companions, such as the verification batch a deployed
    artifact stores beside the model (:func:`companion_bytes`), which is input data whose
    size depends on the input shape, not on the model."""
    return int(artifact_size(path)) - companion_bytes(path)


def companion_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the files an artifact directory holds beside its model: the
    verification batch of a deployed artifact (``deployment.safetensors``); 0 for any other.
    """
    root = Path(path)
    return sum((root / name).stat().st_size for name in COMPANIONS if (root / name).is_file())


def theoretical_bytes(model: nn.Module) -> int:
    """Bytes the recipe implies: the model's tensors as the artifact stores them, without
    the file's headers.

    Packed codes, scale / zero-point / codebook storage and every tensor kept in float at
    its own width (:func:`compactnn.export.size.theoretical_size`), except that a weight
    with zeros (pruned: unstructured, N:M, or a quantized layer's codes at its zero point)
    counts as the artifact stores it when sparse is smaller
    (:func:`compactnn.export.sparse.sparsify`): its non-zero values plus their positions, in
    the cheapest of a bitmap (one bit per weight), gaps or blocks. A 2:4 float32 layer thus
    takes 17 bits per weight (half the values, one index bit per weight: the 2-bit N:M index
    per kept value) at most, not 32; a dense model's is ``theoretical_size`` exactly.

    Example:
        >>> import torch
        >>> from compactnn.export.size import theoretical_size
        >>> layer = nn.Linear(64, 64, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.view(-1, 4)[:, 1:3].zero_()  # 2:4
        >>> model = nn.Sequential(layer)
        >>> theoretical_bytes(model), 64 * 64 * 17 // 8, theoretical_size(model)
        (8704, 8704, 16384)
    """
    tensors, layers, _ = pack_state(model)
    stored, _ = sparsify(tensors, layers, model)
    return sum(t.numel() * t.element_size() for t in stored.values())


_ROOM = "or set TMPDIR to a folder with room for it"
_WRITABLE = "set TMPDIR to a folder you can write"
_TMP_WHY = {
    errno.EFBIG: "the file-size limit (ulimit -f), or the largest file of that file system, is "
    "below the model's size: raise the limit, or set TMPDIR to another file system",
    errno.ENOSPC: f"that folder's disk is full: free some space there, {_ROOM}",
    errno.EDQUOT: f"your disk quota there is used up: free some of it, {_ROOM}",
    errno.EACCES: f"that folder is not writable: {_WRITABLE}",
    errno.EPERM: f"that folder is not writable: {_WRITABLE}",
    errno.EROFS: f"that folder is on a read-only file system: {_WRITABLE}",
}


def float_artifact_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``model`` saved as a compactnn artifact in a temporary directory.

    Raises:
        CompactnnError: the temporary copy could not be written (``ulimit -f``, a full or
            read-only ``TMPDIR``): the user named no such file, so the message names the
            temporary folder and ``TMPDIR`` as the way out, not a path to choose.
    """
    from compactnn.api import save

    try:
        with tempfile.TemporaryDirectory(prefix="compactnn-size-") as tmp:
            save(model, Path(tmp) / "a")
            return artifact_bytes(Path(tmp) / "a")
    except OSError as exc:
        why = _TMP_WHY.get(exc.errno, f"check that folder, {_ROOM}")
        raise CompactnnError(
            f"cannot measure the float model's size on disk: its temporary copy in "
            f"{tempfile.gettempdir()!r} could not be written ({exc.strerror or exc}): {why}."
        ) from exc


def layer_formats(model: nn.Module) -> dict[str, str]:
    """Each weight layer's storage: a quantized format (``uint4-asym-group32``) or its dtype."""
    out = {}
    for name, m in model.named_modules():
        if has_integer_weight(m):  # quantized layers and embedding tables
            act = getattr(m, "input_quantizer", None)
            out[name] = m.format + (f" / act {act.qtype.name}" if act is not None else "")
        elif name in _float_weight_layers(model):
            out[name] = str(m.weight.dtype).removeprefix("torch.")
    return out


def float_weight_layers(model: nn.Module) -> dict[str, str]:
    """Every layer of a compressed model whose weights are float, with the reason: the
    record's ``float_layers`` (kept in float, skipped by a step, channel-pruned), plus each
    layer a pruning step zeroed (unstructured or N:M, its sparsity in
    ``extra["pruning"]``) and left float, which the record leaves out as compressed.

    Example:
        >>> import compactnn, torch
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> pruned = compactnn.compress(model, "sp50", progress=False)  # doctest: +SKIP
        >>> float_weight_layers(pruned)  # doctest: +SKIP
        {'0': 'pruned only (magnitude: 50% of its weights zeroed), weights in float'}
    """
    info = info_of(model)
    out = dict(info.get("float_layers", {}))
    floats = _float_weight_layers(model)
    records = (info.get("extra") or {}).get("pruning")
    for method, layers in (records if isinstance(records, dict) else {}).items():
        for name, value in (layers if isinstance(layers, dict) else {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or name in out:
                continue  # the step's totals (macs, params) are dicts
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue
            if has_integer_weight(layer) or name not in floats:
                continue  # quantized after pruning: not float
            zeroed = f"{method}: {value:.0%} of its weights zeroed"
            out[name] = f"pruned only ({zeroed}), weights in float"
    return out


def _float_weight_layers(model: nn.Module) -> set[str]:
    # a quantized layer owns a child (its input quantizer), so weight_layers misses it
    return set(weight_layers(model))


def ratio_cell(ratio: Any) -> str:
    """An "x smaller" cell: ``3.40x``, or ``1.09x larger`` for an artifact bigger than float
    (a ratio below 1 under "x smaller" reads as a reduction).

    Example:
        >>> ratio_cell(3.4), ratio_cell(0.92), ratio_cell(None)
        ('3.40x', '1.09x larger', 'n/a')
    """
    if ratio is None or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.2f}x" if ratio >= 1 or ratio <= 0 else f"{1 / ratio:.2f}x larger"
