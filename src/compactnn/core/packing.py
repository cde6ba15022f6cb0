"""Bit-packing of integer codes into bytes.

Hand-written because no library packs arbitrary 1..8-bit widths into a dense little bitstream
for safetensors: codes are offset to unsigned (``q - qmin``), each code contributes ``bits``
bits (most significant first), and the stream is padded to a whole byte. ``n`` codes take
exactly ``ceil(n * bits / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from compactnn.core.qtype import QType


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(q: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Pack integer codes (any shape) into a flat ``uint8`` tensor."""
    u = (q.reshape(-1).to(torch.int16) - qtype.qmin).to(torch.uint8).numpy()
    if qtype.bits == 8:
        return torch.from_numpy(u.copy())
    bits = np.unpackbits(u[:, None], axis=1)[:, 8 - qtype.bits :]  # (n, bits), MSB first
    return torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack_codes(packed: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: codes of ``shape`` in ``qtype.storage_dtype``."""
    n = int(np.prod(shape)) if len(shape) else 1
    raw = packed.reshape(-1).numpy()
    if qtype.bits == 8:
        u = raw[:n].astype(np.int16)
    else:
        bits = np.unpackbits(raw)[: n * qtype.bits].reshape(n, qtype.bits)
        weights = (1 << np.arange(qtype.bits - 1, -1, -1)).astype(np.int16)
        u = (bits.astype(np.int16) * weights).sum(axis=1)
    q = torch.from_numpy((u + qtype.qmin).astype(np.int16))
    return q.to(qtype.storage_dtype).reshape(shape)
