"""Binary-basis grids: levels that are sums of a few coefficients with binary weights.

A ``K``-bit code ``q`` (bit ``j``, most significant first) selects one combination of ``K``
coefficients ``v = (v_1, ..., v_K)``:

* **sign basis** (Network Sketching, LQ-Nets weights): ``level(q) = sum_j s_j(q) v_j`` with
  ``s_j(q) = +1`` when bit ``j`` of ``q`` is set and ``-1`` otherwise;
* **{0, 1} basis** (LQ-Nets activations): ``level(q) = sum_j b_j(q) v_j = v^T b(q)`` with
  ``b_j(q)`` bit ``j`` of ``q``.

Storing the ``K`` coefficients instead of the ``2^K`` levels is what makes a basis grid cost
what the papers claim. The levels are always recomputed the same way (float32, the
coefficients as stored, summed in the order ``j = 1..K``), so a reloaded artifact gives
bit-identical weights.
"""

from __future__ import annotations

import torch

MAX_BASES = 8  # codes are at most 8 bits wide


def _bit_table(m: int) -> torch.Tensor:
    if not isinstance(m, int) or not 1 <= m <= MAX_BASES:
        raise ValueError(f"number of bases must be an integer in 1..{MAX_BASES}, got {m!r}")
    q = torch.arange(2**m).unsqueeze(1)
    return (q >> torch.arange(m - 1, -1, -1)) & 1  # (2^m, m): bit j of code q, MSB first


def sign_table(m: int) -> torch.Tensor:
    """``(2^m, m)`` float32: row ``q`` holds the signs of code ``q`` (bit ``j`` set: +1).

    Example:
        >>> sign_table(2).tolist()
        [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    """
    return _bit_table(m).float() * 2 - 1


def bit_table(m: int) -> torch.Tensor:
    """``(2^m, m)`` float32: row ``q`` holds the bits of code ``q`` in ``{0, 1}``, MSB first.

    Example:
        >>> bit_table(2).tolist()
        [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    return _bit_table(m).float()


def _combine(coeffs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(..., 2^m)``: ``sum_j table[q, j] * coeffs[..., j]`` in float32, summed j = 1..m.

    An explicit ordered sum (not a matmul) so the result never depends on a BLAS path.
    """
    c = coeffs.float()
    out = torch.zeros((*c.shape[:-1], table.shape[0]), dtype=torch.float32, device=c.device)
    table = table.to(c.device)
    for j in range(table.shape[1]):
        out = out + c[..., j : j + 1] * table[:, j]
    return out


def basis_levels(basis: torch.Tensor) -> torch.Tensor:
    """Levels ``sum_j s_j(q) basis_j`` of sign-basis coefficients ``basis`` ``(..., m)``.

    Returns ``(..., 2^m)`` float32; level ``q`` is the code whose bit ``j`` (MSB first) is
    the sign of ``basis_j``. Pass the coefficients as stored (float16-representable).

    Example:
        >>> basis_levels(torch.tensor([0.875, 0.375])).tolist()
        [-1.25, -0.5, 0.5, 1.25]
    """
    return _combine(basis, sign_table(basis.shape[-1]))


def binary01_levels(basis: torch.Tensor) -> torch.Tensor:
    """Levels ``v^T b(q)``, ``b(q) in {0, 1}^K``, of coefficients ``basis`` ``(..., K)``.

    Returns ``(..., 2^K)`` float32 (LQ-Nets' activation grid; sort it before
    :meth:`~compactnn.core.qlayers.ActQuantizer.set_levels` if some ``v_j`` is negative).

    Example:
        >>> binary01_levels(torch.tensor([1.0, 0.25])).tolist()
        [0.0, 0.25, 1.0, 1.25]
    """
    return _combine(basis, bit_table(basis.shape[-1]))


def basis_of_levels(levels: torch.Tensor) -> torch.Tensor | None:
    """The sign-basis coefficients ``(..., m)`` whose :func:`basis_levels` are exactly
    ``levels`` ``(..., 2^m)`` with float16-representable coefficients, or None.

    ``v_j = (level(all bits set) - level(all set but bit j)) / 2``, rounded to float16, then
    checked by recomputing the levels.

    Example:
        >>> basis_of_levels(torch.tensor([-1.25, -0.5, 0.5, 1.25])).tolist()
        [0.875, 0.375]
    """
    n = levels.shape[-1]
    m = n.bit_length() - 1
    if n < 2 or 2**m != n or m > MAX_BASES:
        return None
    lv = levels.float()
    top = lv[..., n - 1 : n]
    others = torch.stack([lv[..., (n - 1) ^ (1 << (m - 1 - j))] for j in range(m)], -1)
    v = ((top - others) / 2).to(torch.float16).float()
    if not torch.isfinite(v).all() or not torch.equal(basis_levels(v), lv):
        return None
    return v
