"""Integer quantization types: a small value object that reads like a ``torch.dtype``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactnn.errors import CompactnnError


@dataclass(frozen=True)
class QType:
    """A ``bits``-wide integer grid, signed or unsigned.

    Signed grids are two's-complement (``-2**(b-1) .. 2**(b-1)-1``); unsigned grids are
    ``0 .. 2**b-1``. Codes are held in ``int8``/``uint8`` tensors in memory and bit-packed
    on disk (see :mod:`compactnn.core.packing`).

    Example:
        >>> QType(4, signed=True).qmin, QType(4, signed=True).qmax
        (-8, 7)
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise CompactnnError(
                f"bits={self.bits!r} is out of range: compactnn quantizes to 1..8 bits."
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    def __str__(self) -> str:
        return self.name
