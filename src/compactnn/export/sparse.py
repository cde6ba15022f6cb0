"""Sparse storage in the artifact: pruned zeros cost (almost) nothing on disk.

A weight with many zeros is stored as the positions of its non-zeros plus their values, in
whichever of three encodings is smallest for that tensor (chosen per tensor at save time):

* ``dense``: as before (nothing here applies).
* ``bitmap``: one bit per entry (set = non-zero), then the non-zero values in order.
* ``gaps``: for each stored entry, the number of zeros skipped since the previous one, in
  ``gap_bits`` bits (2..8, the best width for the tensor); a gap too long for the width is
  bridged by a filler entry holding a zero. Best at high sparsity (about 1 bit per weight at
  90% with 4-bit gaps against 1.4 for the bitmap).
* ``blocks``: the flat tensor cut into runs of ``block`` consecutive entries; one bit per run
  (set = the run holds a non-zero), then every entry of the kept runs, zeros included. Best
  for structured sparsity: a pruned PE tile, filter or row of a ``(O, I, kh, kw)`` weight is
  such a run (``block`` is chosen per tensor among the divisors of its size up to
  :data:`MAX_BLOCK`), so its index costs one bit per tile, not per weight.

Values are the float tensor's own elements (bit patterns kept, so ``-0.0`` and NaN survive),
or, for a quantized layer, its integer codes packed at the layer's bit width; there a "zero"
is a code equal to the zero point of its group. Loading rebuilds the exact dense tensor
(bit-exact), then the rest of :mod:`compactnn.export.artifact` proceeds as for dense storage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn.core.packing import pack_codes, packed_nbytes, unpack_codes
from compactnn.core.qtype import QType
from compactnn.core.quantize import grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
GAP_WIDTHS = range(2, 9)
MAX_BLOCK = 4096  # longest run the blocks encoding tries
_DTYPES = {n: getattr(torch, n) for n in ("float16", "bfloat16", "float32", "float64")}


def _bits_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Entries whose bit pattern is not all zeros (``-0.0`` counts as non-zero)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()]) != 0


def _gap_positions(pos: np.ndarray, gap_bits: int) -> np.ndarray:
    """Stored positions: the non-zeros plus fillers every ``2**gap_bits`` zeros."""
    span = 1 << gap_bits
    prev = np.concatenate([[-1], pos[:-1]])
    fillers = (pos - prev - 1) // span  # fillers needed before each non-zero
    if not fillers.any():
        return pos
    j = np.arange(fillers.sum()) - np.repeat(np.cumsum(fillers) - fillers, fillers) + 1
    extra = np.repeat(prev, fillers) + span * j
    return np.sort(np.concatenate([pos, extra]))


def _block_sizes(n: int) -> list[int]:
    """Run lengths the ``blocks`` encoding tries: divisors of ``n`` in ``[2, MAX_BLOCK]``."""
    return [b for b in range(2, min(n, MAX_BLOCK) + 1) if n % b == 0]


def _plan(nz: np.ndarray, value_bits: int) -> tuple[str, int, np.ndarray, int]:
    """Cheapest encoding of a flat non-zero mask: ``(encoding, param, positions, bytes)``;
    ``param`` is the gap width (``gaps``), the run length (``blocks``) or 0."""
    n = nz.size
    pos = np.flatnonzero(nz)
    best = ("dense", 0, pos, packed_nbytes(n, value_bits))
    bitmap = packed_nbytes(n, 1) + packed_nbytes(pos.size, value_bits)
    if bitmap < best[3]:
        best = ("bitmap", 0, pos, bitmap)
    for b in GAP_WIDTHS:
        stored = _gap_positions(pos, b)
        size = packed_nbytes(stored.size, b) + packed_nbytes(stored.size, value_bits)
        if size < best[3]:
            best = ("gaps", b, stored, size)
    for b in _block_sizes(n) if n - pos.size >= 2 else ():  # a run needs zeros to drop
        kept = int(nz.reshape(-1, b).any(axis=1).sum())
        size = packed_nbytes(n // b, 1) + packed_nbytes(kept * b, value_bits)
        if size < best[3]:
            best = ("blocks", b, _block_positions(nz, b), size)
    return best


def _block_positions(nz: np.ndarray, block: int) -> np.ndarray:
    """Every position inside the runs of ``block`` entries that hold a non-zero."""
    runs = np.flatnonzero(nz.reshape(-1, block).any(axis=1))
    return (runs[:, None] * block + np.arange(block)).reshape(-1)


def _encode_index(encoding: str, gap_bits: int, pos: np.ndarray, n: int) -> torch.Tensor:
    if encoding in ("bitmap", "blocks"):
        unit = gap_bits if encoding == "blocks" else 1  # run length, or one entry
        bits = np.zeros(n // unit, dtype=np.uint8)
        bits[pos[::unit] // unit] = 1
        return torch.from_numpy(np.packbits(bits))
    gaps = np.diff(np.concatenate([[-1], pos])) - 1  # each in [0, 2**gap_bits)
    return pack_codes(torch.from_numpy(gaps.astype(np.int16)), QType(gap_bits, signed=False))


def _decode_index(index: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    n = entry["numel"]
    if entry["encoding"] == "bitmap":
        bits = np.unpackbits(index.numpy())[:n].astype(bool)
        return torch.from_numpy(np.flatnonzero(bits))
    if entry["encoding"] == "blocks":
        block = entry["block"]
        runs = np.flatnonzero(np.unpackbits(index.numpy())[: n // block])
        return torch.from_numpy((runs[:, None] * block + np.arange(block)).reshape(-1))
    gaps = unpack_codes(index, QType(entry["gap_bits"], signed=False), (entry["count"],))
    return torch.cumsum(gaps.long() + 1, 0) - 1


def _index_fields(encoding: str, param: int, count: int, numel: int) -> dict[str, Any]:
    """The index part of a sparse entry (``block`` only for the ``blocks`` encoding)."""
    fields = {
        "encoding": encoding,
        "gap_bits": param if encoding == "gaps" else 0,
        "count": int(count),
        "numel": int(numel),
    }
    return fields | ({"block": param} if encoding == "blocks" else {})


def _element_zero(codes: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The zero-point code of every weight entry, flat ``(numel,)``."""
    g = grouped_view(codes, spec.granularity, spec.group_size)  # (rows, ngroups, G)
    z = zero.reshape(g.shape[:2]).to(codes.dtype)
    return z.unsqueeze(-1).expand(g.shape).reshape(-1)


def _sparsify_codes(layer: nn.Module, key: str, out: dict, index: dict) -> None:
    spec = layer.weight_spec
    codes = layer.weight_codes.reshape(-1)
    zero = layer.weight_zero if not spec.symmetric else torch.zeros_like(layer.weight_zero)
    if spec.symmetric and layer.weight_zero.any():
        return  # a symmetric grid with a non-zero zero point is not stored in the file
    nz = (codes != _element_zero(layer.weight_codes, zero, spec)).numpy()
    encoding, gap_bits, pos, _ = _plan(nz, spec.qtype.bits)
    if encoding == "dense":
        return
    del out[key]
    out[f"{key}.sparse_index"] = _encode_index(encoding, gap_bits, pos, nz.size)
    out[f"{key}.sparse_values"] = pack_codes(codes[torch.from_numpy(pos)], spec.qtype)
    index[key] = {
        "kind": "codes",
        **_index_fields(encoding, gap_bits, pos.size, nz.size),
    }


def _sparsify_float(key: str, t: torch.Tensor, out: dict, index: dict) -> None:
    nz = _bits_nonzero(t).reshape(-1).numpy()
    encoding, gap_bits, pos, _ = _plan(nz, 8 * t.element_size())
    if encoding == "dense":
        return
    del out[key]
    out[f"{key}.sparse_index"] = _encode_index(encoding, gap_bits, pos, nz.size)
    out[f"{key}.sparse_values"] = t.reshape(-1)[torch.from_numpy(pos)].clone()
    index[key] = {
        "kind": "float",
        **_index_fields(encoding, gap_bits, pos.size, nz.size),
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
    }


def sparsify(
    tensors: dict[str, torch.Tensor], layers: dict[str, Any], model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Replace tensors that are cheaper sparse; returns ``(tensors, sparse index)``.

    Quantized layers (``layers``, the artifact's per-layer entries) are judged on their
    codes; every other floating tensor of two or more dimensions on its values.
    """
    out = dict(tensors)
    index: dict[str, Any] = {}
    for name in layers:
        _sparsify_codes(model.get_submodule(name), f"{name}.weight.packed", out, index)
    for key, t in tensors.items():
        if key not in index and t.is_floating_point() and t.dim() >= 2 and t.element_size() > 1:
            _sparsify_float(key, t, out, index)
    return out, index


def _is_count(x: Any, hi: int) -> bool:
    return type(x) is int and 0 <= x <= hi


def _need(key: str, t: torch.Tensor | None, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if t is None or t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
        got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise ArtifactError(
            f"sparse tensor {key!r} of the artifact is {got}, the format needs {dtype} "
            f"[{numel}]: the artifact is damaged; re-save it."
        )
    return t


def _check_entry(
    key: str, entry: Any, out: dict, layers: dict[str, Any], reference: dict | None
) -> tuple[int, torch.dtype | QType]:
    """Validate one sparse entry against the sizes its dense tensor must have.

    Returns ``(numel, value type)``; every size is bounded by the skeleton (or the layer's
    validated shape) before anything is allocated.
    """
    if not isinstance(entry, dict) or entry.get("kind") not in ("codes", "float"):
        raise ArtifactError(f"sparse entry {key!r} of the artifact is malformed; re-save it.")
    fields = {"kind", "encoding", "gap_bits", "count", "numel"}
    if entry["kind"] == "codes":
        name = key.removesuffix(".weight.packed")
        if name == key or name not in layers:
            raise ArtifactError(f"sparse entry {key!r} names no quantized layer; re-save it.")
        spec = QuantSpec.from_dict(layers[name]["weight_spec"])
        numel, vtype = int(np.prod(layers[name]["shape"])), spec.qtype
    else:
        fields |= {"shape", "dtype"}
        ref = (reference or {}).get(key)
        if reference is not None and ref is None:
            raise ArtifactError(f"sparse tensor {key!r} is not a tensor of the skeleton.")
        shape, dtype = entry.get("shape"), _DTYPES.get(str(entry.get("dtype")))
        if ref is not None and (shape != list(ref.shape) or dtype != ref.dtype):
            raise ArtifactError(
                f"sparse tensor {key!r} is {entry.get('dtype')!r} {shape!r:.60}, the skeleton "
                f"holds {ref.dtype} {list(ref.shape)}: pass the model it was made from."
            )
        if (
            dtype is None
            or not isinstance(shape, list)
            or not all(_is_count(d, 2**31) for d in shape)
        ):
            raise ArtifactError(f"sparse entry {key!r} has a bad shape or dtype; re-save it.")
        numel, vtype = int(np.prod(shape)), dtype
    encoding, block = entry.get("encoding"), entry.get("block")
    if encoding == "blocks":
        fields |= {"block"}
    ok = (
        set(entry) == fields
        and entry["numel"] == numel
        and _is_count(entry["count"], numel)
        and (
            (encoding == "bitmap" and entry["gap_bits"] == 0)
            or (
                encoding == "gaps"
                and type(entry["gap_bits"]) is int
                and entry["gap_bits"] in GAP_WIDTHS
            )
            or (
                encoding == "blocks"
                and entry["gap_bits"] == 0
                and type(block) is int
                and 2 <= block <= MAX_BLOCK
                and numel % block == 0
                and entry["count"] % block == 0
            )
        )
    )
    if not ok:
        raise ArtifactError(f"sparse entry {key!r} of the artifact is malformed; re-save it.")
    count = entry["count"]
    index_bytes = {
        "bitmap": lambda: packed_nbytes(numel, 1),
        "gaps": lambda: packed_nbytes(count, entry["gap_bits"]),
        "blocks": lambda: packed_nbytes(numel // block, 1),
    }[encoding]()
    _need(f"{key}.sparse_index", out.get(f"{key}.sparse_index"), torch.uint8, index_bytes)
    if isinstance(vtype, QType):
        _need(
            f"{key}.sparse_values",
            out.get(f"{key}.sparse_values"),
            torch.uint8,
            packed_nbytes(count, vtype.bits),
        )
    else:
        _need(f"{key}.sparse_values", out.get(f"{key}.sparse_values"), vtype, count)
    return numel, vtype


def densify(
    tensors: dict[str, torch.Tensor],
    index: dict[str, Any],
    layers: dict[str, Any],
    reference: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sparsify`: the dense tensors (packed codes re-packed) by key.

    Every entry is checked first (sizes of its index and values, positions inside the tensor),
    so a damaged entry raises :class:`ArtifactError` without a large allocation. With
    ``reference`` (the skeleton's state dict) a float entry must match its tensor's shape
    and dtype.
    """
    out = dict(tensors)
    for key, entry in index.items():
        _check_entry(key, entry, out, layers, reference)
        pos = _decode_index(out.pop(f"{key}.sparse_index"), entry)
        if pos.numel() != entry["count"] or (pos.numel() and int(pos[-1]) >= entry["numel"]):
            raise ArtifactError(f"sparse tensor {key!r} of the artifact is damaged: bad index.")
        values = out.pop(f"{key}.sparse_values")
        if entry["kind"] == "float":
            flat = torch.zeros(entry["numel"], dtype=values.dtype)
            flat[pos] = values
            out[key] = flat.reshape(entry["shape"])
            continue
        name = key.removesuffix(".weight.packed")
        spec = QuantSpec.from_dict(layers[name]["weight_spec"])
        codes = torch.zeros(tuple(layers[name]["shape"]), dtype=spec.qtype.storage_dtype)
        zero, scale = out.get(f"{name}.weight.zero"), out.get(f"{name}.weight.scale")
        zero = torch.zeros(scale.shape) if zero is None else zero
        try:
            flat = _element_zero(codes, zero, spec).clone()
        except RuntimeError as exc:
            raise ArtifactError(f"sparse tensor {key!r}: its zero points do not fit.") from exc
        flat[pos] = unpack_codes(values, spec.qtype, (entry["count"],))
        out[key] = pack_codes(flat, spec.qtype)
    return out


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data (without the file's JSON header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
