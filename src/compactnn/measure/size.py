"""Sizes: bytes on disk of an artifact's model, bytes a recipe implies, and each layer's format.

Example:
    >>> from torch import nn
    >>> layer_formats(nn.Sequential(nn.Linear(4, 2)))
    {'0': 'float32'}
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save as save_bytes
from torch import nn

from compactnn.core.modules import weight_layers
from compactnn.core.packing import packed_nbytes
from compactnn.core.qlayers import has_integer_weight
from compactnn.errors import CompactnnError
from compactnn.export.artifact import COMPANIONS, info_of, pack_state
from compactnn.export.size import artifact_size
from compactnn.export.sparse import GAP_WIDTHS, MAX_BLOCK, sparsify


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
    """Bytes on disk of ``model`` saved as a compactnn artifact (:func:`artifact_bytes` of
    the folder ``compactnn.save`` writes), computed without writing it
    (:func:`computed_artifact_bytes`) for a float model: a 7B model's copy would take ~28 GB
    of temporary disk and raise the command's peak memory. A model whose artifact the
    computation does not cover (quantized layers) is saved into a temporary folder and
    measured (:func:`written_artifact_bytes`).

    Raises:
        CompactnnError: ``save`` refuses the model, or its temporary copy could not be
            written (see :func:`written_artifact_bytes`).
    """
    size = computed_artifact_bytes(model)
    return size if size is not None else written_artifact_bytes(model)


def computed_artifact_bytes(model: nn.Module) -> int | None:
    """Bytes of the artifact ``compactnn.save`` writes for a float ``model``, computed from
    the tensors' names, dtypes and shapes as ``save`` lays them out (tied tensors once, a
    weight with zeros stored sparse where that is smaller), nothing written and no tensor
    copied; None for a model with quantized layers or tables, or when the safetensors
    library lays out its header otherwise than :func:`safetensors_bytes` expects.

    Raises:
        CompactnnError: ``save`` would refuse the model (the same message).
    """
    from compactnn.export.artifact import header_body
    from compactnn.export.replace import _dumps
    from compactnn.export.save_checks import refuse_unsaveable, unprintable
    from compactnn.export.validate import FILE_ROLES, check_header, check_printable

    refuse_unsaveable(model)  # save's own refusals first, as save makes them
    if getattr(model, "not_saveable", None) is not None or _has_packed_layers(model):
        return None
    entries, aliases, sparse_index = _stored_tensors(model)
    tensor_bytes = safetensors_bytes(entries)
    if tensor_bytes is None:
        return None
    body = header_body(model, {}, aliases, sparse_index, {})
    check_printable(body, fail=unprintable)
    files = {"tensors": _file_entry(FILE_ROLES["tensors"], tensor_bytes)}
    if (recipe := info_of(model).get("recipe")) is not None:
        recipe_bytes = len(recipe.to_yaml().encode("utf-8"))
        files["recipe"] = _file_entry(FILE_ROLES["recipe"], recipe_bytes)
    header = {**body, "files": files, "digest": _HASH}  # hashes: 64 hex digits, as written
    check_header(header)
    total = sum(f["bytes"] for f in files.values())
    return total + len(_dumps(header).encode("utf-8"))


_HASH = "0" * 64
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _file_entry(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "bytes": size, "sha256": _HASH}


def _has_packed_layers(model: nn.Module) -> bool:
    from compactnn.core.qembedding import QuantEmbedding
    from compactnn.core.qlayers import is_quant_layer

    return any(is_quant_layer(m) or isinstance(m, QuantEmbedding) for m in model.modules())


Stored = tuple[str, torch.dtype, list[int]]  # a tensor of the file: name, dtype, shape


def _stored_tensors(model: nn.Module) -> tuple[list[Stored], dict, dict]:
    """``([(name, dtype, shape)], aliases, sparse index)`` of a float model as ``save``
    stores it (``pack_model``, then ``sparsify``): a tensor tied to an earlier one is an
    alias; a floating weight of two or more dimensions with exact zeros is stored sparse
    when an encoding is smaller (:func:`_cheapest_encoding`, :func:`_sparse_tensors`); one
    without zeros is dense (every sparse encoding stores all its values plus an index).
    Nothing is copied: only names, dtypes, shapes and the runs of zeros are read."""
    entries: list[Stored] = []
    aliases: dict[str, str] = {}
    index: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:  # tied weights (e.g. lm_head = embeddings)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        plan = _cheapest_encoding(t) if _has_zeros(t) else ("dense", 0, t.numel())
        if plan[0] == "dense":
            entries.append((key, t.dtype, list(t.shape)))
        else:
            stored, index[key] = _sparse_tensors(key, t, *plan)
            entries += stored
    return entries, aliases, index


def _has_zeros(t: torch.Tensor) -> bool:
    """Whether ``sparsify`` may store ``t`` sparse: a floating tensor of two or more
    dimensions, wider than a byte, with an entry whose bits are all zero."""
    if not (t.is_floating_point() and t.dim() >= 2 and t.element_size() > 1):
        return False
    return any(bool((part == 0).any()) for part in _bit_chunks(t))


_CHUNK = 1 << 22  # entries read at a time: a mask of 4 MiB, not one as large as the tensor


def _bit_chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t``'s entries as integers of its width (bit patterns: ``-0.0`` is not zero), flat,
    in chunks of ``_CHUNK`` (a non-contiguous tensor in one piece)."""
    bits = t.detach().view(_INT_OF_WIDTH[t.element_size()])
    if not bits.is_contiguous():
        yield bits.reshape(-1)
        return
    flat = bits.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


def _cheapest_encoding(t: torch.Tensor) -> tuple[str, int, int]:
    """``(encoding, param, stored entries)`` that ``sparsify`` picks for ``t``: the first
    smallest of dense, bitmap, gaps of 2 to 8 bits, blocks of each divisor of its size up
    to ``MAX_BLOCK`` (``param``: the gap width or run length). The sizes are those
    ``sparsify`` compares, computed from the runs of zeros alone (a token table's padding
    row: one run), not from arrays of positions as large as the tensor."""
    found, start = [], 0
    for part in _bit_chunks(t):
        found.append(torch.nonzero(part == 0).reshape(-1).cpu().numpy() + start)
        start += part.numel()
    zeros = np.concatenate(found)
    n, bits = t.numel(), 8 * t.element_size()
    kept = n - zeros.size  # the non-zeros
    breaks = np.flatnonzero(np.diff(zeros) != 1)
    starts = zeros[np.concatenate([[0], breaks + 1])] if zeros.size else zeros
    ends = zeros[np.concatenate([breaks, [zeros.size - 1]])] + 1 if zeros.size else zeros
    before_value = (ends - starts)[ends < n]  # a gap: a run of zeros before a non-zero
    best, size = ("dense", 0, n), packed_nbytes(n, bits)
    plans = [(("bitmap", 0, kept), packed_nbytes(n, 1) + packed_nbytes(kept, bits))]
    for gap in GAP_WIDTHS:  # a filler entry every 2**gap zeros of a gap
        stored = kept + int((before_value >> gap).sum())
        plans.append(
            (("gaps", gap, stored), packed_nbytes(stored, gap) + packed_nbytes(stored, bits))
        )
    blocks = range(2, min(n, MAX_BLOCK) + 1) if n - kept >= 2 else ()
    for block in (b for b in blocks if n % b == 0):  # runs of zeros only, dropped
        empty = int(np.maximum(ends // block - -(-starts // block), 0).sum())
        stored = n - empty * block
        plans.append(
            (("blocks", block, stored), packed_nbytes(n // block, 1) + packed_nbytes(stored, bits))
        )
    for plan, bytes_ in plans:
        if bytes_ < size:
            best, size = plan, bytes_
    return best


def _sparse_tensors(
    key: str, t: torch.Tensor, encoding: str, param: int, count: int
) -> tuple[list[Stored], dict[str, Any]]:
    """The two tensors ``sparsify`` stores for ``t`` under ``encoding`` (its index, packed
    ``uint8``; the ``count`` stored values, ``t``'s dtype) and its sparse-index entry."""
    n = t.numel()
    index_bytes = {
        "bitmap": packed_nbytes(n, 1),
        "blocks": packed_nbytes(n // max(param, 1), 1),
        "gaps": packed_nbytes(count, param),
    }[encoding]
    stored = [
        (f"{key}.sparse_index", torch.uint8, [index_bytes]),
        (f"{key}.sparse_values", t.dtype, [count]),
    ]
    entry = {
        "kind": "float",
        "encoding": encoding,
        "gap_bits": param if encoding == "gaps" else 0,
        "count": count,
        "numel": n,
        **({"block": param} if encoding == "blocks" else {}),
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
    }
    return stored, entry


def safetensors_bytes(entries: list[Stored]) -> int | None:
    """Bytes of the safetensors file of ``entries`` (name, dtype, shape) as ``write_tensors``
    writes it: 8 bytes of header length, the JSON header padded with spaces to a multiple
    of 8, then every tensor's bytes. The library itself serializes empty stand-ins of the
    same names and dtypes (its tensor order, dtype names and escaping); the header is then
    rebuilt with the real shapes and offsets. None when the rebuilt stand-in header is not
    the library's, byte for byte (another layout than this function knows), or the library
    refuses a dtype (``save`` then says why).
    """
    stand_ins = {name: torch.empty(0, dtype=dtype) for name, dtype, _ in entries}
    try:
        raw = save_bytes(stand_ins, metadata={"format": "pt"})
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError):
        return None  # a dtype it refuses: the written copy says why
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if len(raw) != 8 + n or _header_text(header) != raw[8:]:
        return None
    real = {name: (stand_ins[name].element_size(), shape) for name, _, shape in entries}
    offset = 0
    for name, field in header.items():  # the library's order: the order of the data
        if name == "__metadata__":
            continue
        width, shape = real[name]
        nbytes = width * math.prod(shape)
        field["shape"], field["data_offsets"] = shape, [offset, offset + nbytes]
        offset += nbytes
    return 8 + len(_header_text(header)) + offset


def _header_text(header: dict[str, Any]) -> bytes:
    """A safetensors JSON header as the library writes it: compact, UTF-8, padded with
    spaces to a multiple of 8 bytes."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def written_artifact_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``model`` saved as a compactnn artifact in a temporary directory.

    Raises:
        CompactnnError: ``TMPDIR`` names no folder one can write (Python's tempfile would
            silently write the copy elsewhere: :func:`check_tmpdir`), or the temporary copy
            could not be written (``ulimit -f``, a full or read-only ``TMPDIR``): the user
            named no such file, so the message names the temporary folder and ``TMPDIR`` as
            the way out, not a path to choose.
    """
    from compactnn.api import save

    check_tmpdir("cannot measure the float model's size on disk: it needs a temporary copy")
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


def check_tmpdir(need: str) -> None:
    """Refuse a ``TMPDIR`` that is missing, not a folder, or not writable, before a
    temporary copy is made: Python's tempfile would silently use another folder (``/tmp``),
    which the user did not choose (a small or shared disk, the very one ``TMPDIR`` was set
    to avoid). ``need``: what the copy is for, the message's start.
    """
    asked = os.environ.get("TMPDIR")
    if not asked:  # unset or empty: tempfile's own choice, as the user left it
        return
    if not os.path.exists(asked):
        why, fix = "which does not exist", "create it, or set TMPDIR to a folder you can write"
    elif not os.path.isdir(asked):
        why, fix = "which is not a folder", "set TMPDIR to a folder you can write"
    elif not os.access(asked, os.W_OK | os.X_OK):
        why, fix = "which is not writable", "set TMPDIR to a folder you can write"
    else:
        return
    raise CompactnnError(
        f"{need}, and TMPDIR is {asked!r}, {why} (Python would put the copy in "
        f"{tempfile.gettempdir()!r} instead): {fix} with room for the model."
    )


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
