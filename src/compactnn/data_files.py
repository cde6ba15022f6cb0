"""Data files the command line reads (``--data``, ``--weights``): ``.safetensors`` and ``.npy``
files, checked before they are read: a regular file (never a FIFO or a device), a ``.npy``
header that matches the bytes after it, tensors with one row per example.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from compactnn.errors import CompactnnError, first_line


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, with a clear error when it is unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise CompactnnError(
            f"{str(path)!r} is a folder; a .safetensors file is expected (e.g. "
            f"{str(path / 'model.safetensors')!r})."
        )
    check_regular_file(path, f"file {str(path)!r}", "a .safetensors file")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CompactnnError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc


def check_regular_file(path: Path, label: str, expected: str) -> None:
    """Refuse a missing ``path``, and one that is not a regular file (a FIFO, a device such as
    a link to ``/dev/zero``, a socket: reading it could block or never end)."""
    if path.is_file():
        return
    if os.path.exists(path):
        raise CompactnnError(
            f"{label} is not a regular file (a FIFO, device or socket): pass {expected} "
            "saved on disk."
        )
    raise CompactnnError(f"{label} does not exist.")


def npy_layout(f: Any) -> tuple[tuple[int, ...], Any, int]:
    """``(shape, dtype, data_offset)`` from the header of the ``.npy`` file open as ``f``
    (binary, at its start); nothing else is read.

    Raises:
        ValueError: not a ``.npy`` file, a header numpy cannot parse, or format 3.0 (UTF-8
            field names of a structured array).
    """
    from numpy.lib import format as npf

    version = npf.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = npf.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = npf.read_array_header_2_0(f)
    else:  # 3.0: UTF-8 field names of structured arrays, never plain numeric inputs
        raise ValueError(f"format version {version[0]}.{version[1]} is not read here")
    return tuple(shape), dtype, f.tell()


def check_npy_size(path: Path, spec: str) -> None:
    """Refuse, before any memory is allocated, a ``.npy`` file whose header declares an
    array of another size than the bytes after it (a huge declared shape, a truncated file);
    object arrays are left to ``np.load``, which refuses them without pickle."""
    try:
        with open(path, "rb") as f:
            shape, dtype, offset = npy_layout(f)
            stored = os.fstat(f.fileno()).st_size - offset
    except ValueError as exc:
        raise CompactnnError(
            f"data file {spec!r} is not a .npy file numpy reads ({first_line(exc)}); save "
            "inputs with numpy.save."
        ) from exc
    if dtype.hasobject:
        return
    declared = math.prod(shape) * dtype.itemsize
    if declared != stored:
        raise CompactnnError(
            f"data file {spec!r} declares a {dtype} array of shape {shape} ({declared:,} bytes)"
            f" but holds {stored:,} bytes of data: it is truncated or its header is damaged; "
            "save it again with numpy.save."
        )


def read_npy(spec: str) -> Any:
    """The array of the ``.npy`` file ``spec``, read without pickle once its header is checked
    (:func:`check_npy_size`)."""
    import numpy as np

    path = Path(spec)
    check_regular_file(path, f"data file {spec!r}", "a .npy file")
    check_npy_size(path, spec)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CompactnnError(f"{spec!r} cannot be read without pickle: {exc}") from exc


def check_rows(spec: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors of one file with different first dimensions (one row per example);
    a ``_train`` / ``_test`` split is checked within each part."""
    groups: dict[str, list[str]] = {}
    for key, t in tensors.items():
        part = next((s for s in ("_train", "_test") if key.endswith(s)), "")
        if t.dim():
            groups.setdefault(part, []).append(key)
    for keys in groups.values():
        if len({tensors[k].shape[0] for k in keys}) > 1:
            shapes = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in keys[:4])
            raise CompactnnError(
                f"data {spec!r} holds tensors with different first dimensions ({shapes}): each "
                "tensor needs one row per example; save them with the same number of rows."
            )
