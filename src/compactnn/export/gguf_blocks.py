"""compactnn integer grids as llama.cpp's GGUF blocks of 32, exactly or not at all.

A compactnn weight is ``w = (q - z) * s`` with integer codes ``q``, an integer zero point ``z``
and a float16-representable scale ``s`` per group. llama.cpp's legacy block types hold 32
consecutive weights of a row with one float16 scale ``d`` (and, for the ``_1`` types, one
float16 offset ``m``):

==========  ======================  =====================  ==============
type        stored code ``c``       value                  bits / weight
==========  ======================  =====================  ==============
``Q4_0``    ``0..15``               ``d * (c - 8)``        4.5
``Q4_1``    ``0..15``               ``d * c + m``          5.0
``Q5_0``    ``0..31``               ``d * (c - 16)``       5.5
``Q5_1``    ``0..31``               ``d * c + m``          6.0
``Q8_0``    ``-128..127``           ``d * c``              8.5
==========  ======================  =====================  ==============

A compactnn group of ``G`` weights (``G`` a multiple of 32, or a whole row of a multiple of 32)
becomes ``G / 32`` blocks with ``d = s``. With ``r = q - z`` (an integer):

* ``Q4_0`` / ``Q5_0`` / ``Q8_0`` when every ``r`` of the tensor lies in ``[-8, 7]`` /
  ``[-16, 15]`` / ``[-128, 127]``: ``c = r + 8`` / ``r + 16`` / ``r``;
* ``Q4_1`` / ``Q5_1`` when each block has an integer offset ``o`` with ``q - o`` in ``[0, 15]``
  / ``[0, 31]`` and ``m = s * (o - z)`` exactly representable in float16: ``c = q - o``.

Both are exact in float32 arithmetic: ``d * c`` and ``m`` are exact products of a float16
significand (11 bits) and an integer of at most 9 bits, and so is their sum ``s * (q - z)``.
:func:`exact_blocks` picks the smallest exact type of a tensor or says why there is none.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

BLOCK = 32

#: bits per weight of each block type (scale and offset included)
BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}
#: smallest first: the order :func:`exact_blocks` tries them in
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_SYMMETRIC = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}
_WITH_MIN = {"Q4_1": 15, "Q5_1": 31}


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A tensor as GGUF blocks: ``data`` is ``(rows, K / 32 * block_bytes)`` uint8."""

    ggml_type: str
    data: np.ndarray


def block_grid(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, granularity: str, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """Codes ``(rows, K)`` and per-block ``d``, ``z`` ``(rows, K / 32)``, or why not.

    Args:
        codes: integer codes, the weight's 2-D shape ``(rows, K)``.
        scale: ``(rows, ngroups)`` float16-representable scales.
        zero: ``(rows, ngroups)`` integer-valued zero points.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        group: the group size (``granularity="group"``), else ignored.

    Returns:
        ``(q, d, z)`` as int32 / float32 / float32 tensors, or a reason string.
    """
    rows, k = codes.shape
    if k % BLOCK:
        return f"rows of {k} weights do not split into GGUF blocks of {BLOCK}"
    if granularity == "group" and group % BLOCK:
        return f"groups of {group} weights do not tile GGUF blocks of {BLOCK}"
    if torch.any(scale.to(torch.float16).to(torch.float32) != scale):
        return "a scale is not exactly representable in float16"
    nb = k // BLOCK
    per = {"tensor": None, "channel": nb, "group": group // BLOCK if group else 1}[granularity]
    if per is None:  # one scale for the tensor: (1, 1) -> every block
        d, z = scale.reshape(1, 1).expand(rows, nb), zero.reshape(1, 1).expand(rows, nb)
    else:  # (rows, ngroups) -> (rows, ngroups * per): each group spans `per` blocks
        d, z = scale.repeat_interleave(per, dim=1), zero.repeat_interleave(per, dim=1)
    return codes.to(torch.int32), d.float().contiguous(), z.float().contiguous()


def _offsets(qb: torch.Tensor, d: torch.Tensor, z: torch.Tensor, span: int) -> torch.Tensor | None:
    """Per block an offset ``o`` with ``q - o`` in ``[0, span]`` and ``d * (o - z)`` float16-exact.

    ``qb`` is ``(n, 32)``; ``d``, ``z`` are ``(n,)``. Returns ``(n,)`` int32 offsets or None.
    """
    lo, hi = qb.min(dim=1).values, qb.max(dim=1).values
    if torch.any(hi - lo > span):
        return None
    # candidates o = hi - span + t, t = 0..span, valid while o <= lo; the first exact one wins
    cand = (hi - span).unsqueeze(1) + torch.arange(span + 1, dtype=torch.int32)  # (n, span+1)
    m = d.unsqueeze(1) * (cand.float() - z.unsqueeze(1))
    ok = (cand <= lo.unsqueeze(1)) & (m.to(torch.float16).to(torch.float32) == m)
    if not torch.all(ok.any(dim=1)):
        return None
    first = ok.int().argmax(dim=1)  # index of the first True
    return cand.gather(1, first.unsqueeze(1)).squeeze(1)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)  # (n, 2)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """``(n, 32)`` codes -> ``(n, 16)`` bytes: low nibble weight ``j``, high nibble ``j + 16``."""
    c = c.astype(np.uint8)
    return (c[:, :16] & 0x0F) | ((c[:, 16:] & 0x0F) << 4)


def _high_bits(c: np.ndarray) -> np.ndarray:
    """``(n, 32)`` 5-bit codes -> ``(n, 4)`` bytes: bit ``j`` of a little-endian uint32 is
    bit 4 of weight ``j``."""
    bits = ((c.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8)


def pack_blocks(
    ggml_type: str, c: np.ndarray, d: torch.Tensor, m: torch.Tensor | None
) -> np.ndarray:
    """``(n, 32)`` stored codes and ``(n,)`` ``d`` (and ``m``) -> ``(n, block_bytes)`` uint8."""
    parts = [_f16_bytes(d)]
    if ggml_type.endswith("_1"):
        parts.append(_f16_bytes(m))
    if ggml_type.startswith("Q5"):
        parts.append(_high_bits(c))
    if ggml_type == "Q8_0":
        parts.append(c.astype(np.int8).view(np.uint8))
    else:
        parts.append(_nibbles(c))
    return np.concatenate(parts, axis=1)


def exact_blocks(q: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> Blocks | str:
    """The smallest GGUF block type holding ``(q - z) * d`` exactly, packed; or why none does.

    Args:
        q: ``(rows, K)`` integer codes.
        d, z: ``(rows, K / 32)`` float16-exact scales and integer zero points per block.

    Example:
        >>> q = torch.tensor([[-3, 7] * 16])
        >>> exact_blocks(q, torch.tensor([[0.5]]), torch.zeros(1, 1)).ggml_type
        'Q4_0'
    """
    rows = q.shape[0]
    qb = q.reshape(-1, BLOCK)  # (n, 32), n = rows * K / 32
    db, zb = d.reshape(-1), z.reshape(-1)
    r = qb - zb.to(torch.int32).unsqueeze(1)
    for ggml_type in BLOCK_TYPES:
        if ggml_type in _SYMMETRIC:
            lo, hi = _SYMMETRIC[ggml_type]
            if r.min() < lo or r.max() > hi:
                continue
            c, m = (r - lo if ggml_type != "Q8_0" else r).numpy(), None
        else:
            off = _offsets(qb, db, zb, _WITH_MIN[ggml_type])
            if off is None:
                continue
            c, m = (qb - off.unsqueeze(1)).numpy(), db * (off.float() - zb)
        return Blocks(ggml_type, pack_blocks(ggml_type, c, db, m).reshape(rows, -1))
    return f"codes minus zero point span {int(r.min())}..{int(r.max())}, beyond Q8_0's int8"


def rope_permute(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from Hugging Face's rotate-half rotary layout to
    llama.cpp's interleaved one (what llama.cpp's converter does to float weights).

    Row ``h * D + 2 i + j`` of the result is row ``h * D + j * D / 2 + i`` of ``x`` (head
    ``h``, head size ``D``, ``i < D / 2``, ``j`` in {0, 1}): a pure reordering, so codes,
    scales and zero points permute with their rows and stay exact.
    """
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
