"""Data files the command line reads (``--data``, ``--weights``): ``.safetensors`` and ``.npy``
files, checked before they are read: a regular file (never a FIFO or a device), a ``.npy``
header that matches the bytes after it, tensors with one row per example.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.input_dtypes import takes_token_ids
from compactnn.errors import CompactnnError, first_line, is_out_of_memory


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, with a clear error when it is unreadable.

    Raises:
        CompactnnError: not a file, or not a safetensors file.
        MemoryError: too little memory to read it (an ENOMEM, a failed allocation: not the
            file's fault), naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CompactnnError(
            f"{str(path)!r} is a folder; a .safetensors file is expected (e.g. "
            f"{str(path / 'model.safetensors')!r})."
        )
    check_regular_file(path, f"file {str(path)!r}", "a .safetensors file")
    try:
        return load_safetensors(path)
    except Exception as exc:
        if is_out_of_memory(exc) or "Cannot allocate memory" in str(exc):  # ENOMEM's words
            raise MemoryError(f"reading {str(path)!r}: {first_line(exc)}") from exc
        if (kind := pickled_kind(path)) is not None:
            raise CompactnnError(
                f"{str(path)!r} is not a safetensors file: it looks like {kind}, which "
                "compactnn never unpickles (that runs code from the file). Convert it on your "
                "side, where you trust it: load it into your model with torch.load, then "
                "safetensors.torch.save_file(model.state_dict(), 'net.safetensors') (data: "
                "save_file({'x': x}, 'data.safetensors')), and pass the .safetensors file."
            ) from exc
        raise CompactnnError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` for any file name: safetensors refuses a name that is
    not valid UTF-8 (``Path ... is not valid UTF-8``, e.g. a Latin-1 ``w\\xe9.safetensors``),
    so such a file is opened here and safetensors reads it as ``/proc/self/fd/N`` (Linux),
    else from its bytes. Either way safetensors checks the header against the file's size
    before it allocates anything."""
    import safetensors.torch

    name = str(path)
    if _is_utf8(name):
        return safetensors.torch.load_file(name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        alias = _fd_name(fd)
        if alias is not None:
            return safetensors.torch.load_file(alias)
        with os.fdopen(os.dup(fd), "rb") as f:
            return safetensors.torch.load(f.read())
    finally:
        os.close(fd)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the name, kept as lone surrogates
        return False
    return True


def _fd_name(fd: int) -> str | None:
    """A path that opens the file open as ``fd`` (``/proc/self/fd/N``), None without one."""
    alias = f"/proc/self/fd/{fd}"
    return alias if os.path.exists(alias) else None


def pickled_kind(path: Path) -> str | None:
    """What a file that is not safetensors looks like from its first bytes (never
    unpickled): ``torch.save``'s zip archive or a bare pickle; None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        return "a pickled torch file (torch.save's zip archive)"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol
        return "a pickled torch file (a bare pickle)"
    return None


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
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CompactnnError(f"{spec!r} cannot be read without pickle: {exc}") from exc
    if array.ndim == 0:
        raise CompactnnError(
            f"data file {spec!r} holds a scalar (a 0-d array), not a batch of inputs: save "
            "inputs with the batch dimension first, shape (N, ...), e.g. numpy.save(path, "
            "x.reshape(1, -1)) for one."
        )
    return array


def check_rows(spec: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors of one file with different first dimensions (one row per example);
    a ``_train`` / ``_val`` / ``_test`` split is checked within each part."""
    groups: dict[str, list[str]] = {}
    for key, t in tensors.items():
        part = next((s for s in ("_train", "_val", "_test") if key.endswith(s)), "")
        if t.dim():
            groups.setdefault(part, []).append(key)
    for keys in groups.values():
        if len({tensors[k].shape[0] for k in keys}) > 1:
            shapes = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in keys[:4])
            raise CompactnnError(
                f"data {spec!r} holds tensors with different first dimensions ({shapes}): each "
                "tensor needs one row per example; save them with the same number of rows."
            )


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (never imports transformers:
    without it loaded, no model is one)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def keywords_for(
    model: nn.Module | None, tensor: torch.Tensor, name: str | None = None, spec: str = ""
) -> Any:
    """A single tensor as a Hugging Face model's keyword input: under its own name when the
    model's ``forward`` takes it, else the model's main input (``input_ids``,
    ``pixel_values``); other models take the tensor itself.

    Raises:
        CompactnnError: the tensor (of the file ``spec``, named ``name`` unless an array) goes
            to the main input and is not its kind: floats for a BERT's integer ``input_ids``,
            token ids for a ViT's ``pixel_values``.
    """
    if model is None or not is_hf_model(model):
        return tensor
    main = model.main_input_name
    if name in inspect.signature(model.forward).parameters:
        return {name: tensor}
    wants_ids = main in ("input_ids", "decoder_input_ids")
    if wants_ids == (tensor.is_floating_point() or tensor.is_complex()):
        held = f"{str(tensor.dtype).removeprefix('torch.')}, shape {tuple(tensor.shape)}"
        held = f"one tensor, {name[:80]!r} ({held})" if name else f"an array ({held})"
        takes = f" takes no {name[:80]!r}: its" if name else "'s"
        expects = "integer token ids from its tokenizer" if wants_ids else "floating-point values"
        raise CompactnnError(
            f"data {spec!r} holds {held}, and {type(model).__name__}{takes} input is {main} "
            f"({expects}); pass data made for this model, saved under the name {main!r}."
        )
    return {main: tensor}


def float_dtype(model: nn.Module | None) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 by default)."""
    params = model.parameters() if model is not None else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def cast_float(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point data in the model's dtype (numpy saves float64); integers (token ids,
    labels) and booleans unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def first_layer(model: nn.Module) -> tuple[str, nn.Module | None]:
    """``(name, module)`` of the first module (in definition order) holding weights."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            return name, module
    return "", None


def check_float_inputs(model: nn.Module | None, data: Any, what: str) -> None:
    """Refuse integer inputs (``uint8`` pixels, ``int64`` values: a tensor, or the tensors
    of a dict of keyword inputs) for a model whose first layer with weights is a convolution
    or a linear layer: it computes in floating point and would fail on the first batch.
    Token ids (a model that reads them) and other models pass.

    Raises:
        CompactnnError: naming the data (``what``, e.g. ``"--data int.npy"``), its dtype, the
            model's first layer, and the cast.
    """
    tensors = data.items() if isinstance(data, dict) else [("", data)]
    for key, tensor in tensors:
        if model is None or not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            continue
        name, first = first_layer(model)
        float_layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        if takes_token_ids(model) or not isinstance(first, float_layers):
            return
        held = f"{what}'s {key!r}" if key else what
        raise CompactnnError(
            f"{held} holds {str(tensor.dtype).removeprefix('torch.')} values, and "
            f"{type(model).__name__} reads floating-point inputs (its first layer {name!r} is "
            f"a {type(first).__name__}): cast them to float32 before saving "
            "(x.astype(numpy.float32) or tensor.float(), scaled as in training)."
        )
