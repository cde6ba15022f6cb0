"""Pure quantize / dequantize functions.

Every tensor is quantized in a *grouped view* of shape ``(rows, ngroups, group)``:

* per-tensor:  ``(1, 1, N)``
* per-channel: ``(out, 1, K)`` where ``K`` is everything but dim 0
* per-group:   ``(out, K // G, G)``

Scales and zero points have shape ``(rows, ngroups)``; they broadcast over the last dim.
"""

from __future__ import annotations

import torch

from compactnn.core.qtype import QType
from compactnn.errors import CompactnnError

# Scales are stored as float16 on disk; keeping them fp16-representable in memory makes the
# simulated model and the loaded artifact bit-identical. The floor keeps an all-zero group
# from dividing by zero and stays above fp16's smallest normal.
SCALE_FLOOR = 2.0**-14


def grouped_view(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """Reshape ``x`` to ``(rows, ngroups, group)`` for the given granularity.

    Raises:
        CompactnnError: when ``group_size`` does not divide the per-channel length.
    """
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    rows = x.shape[0]
    flat = x.reshape(rows, -1)  # (out, K)
    if granularity == "channel":
        return flat.unsqueeze(1)
    k = flat.shape[1]
    if group_size is None or k % group_size:
        raise CompactnnError(
            f"group_size={group_size} does not divide the input dimension {k} of a tensor "
            f"of shape {tuple(x.shape)}; pick a divisor of {k} or per-channel granularity."
        )
    return flat.reshape(rows, k // group_size, group_size)


def scale_zero_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, qtype: QType, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued) zero point mapping ``[xmin, xmax]`` onto ``qtype``'s grid.

    The range is widened to contain 0 so that an exact zero (padding, ReLU) is representable.
    """
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = absmax / max(qtype.qmax, 1)
        zero = torch.zeros_like(scale)
        if not qtype.signed:  # symmetric unsigned: grid centred at the middle code
            scale = 2 * absmax / (qtype.qmax - qtype.qmin)
            zero = torch.full_like(scale, float((qtype.qmin + qtype.qmax + 1) // 2))
    else:
        scale = (xmax - xmin) / (qtype.qmax - qtype.qmin)
    scale = round_scale(scale)
    if not symmetric:
        zero = torch.clamp(qtype.qmin - torch.round(xmin / scale), qtype.qmin, qtype.qmax)
    return scale, zero


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Floor and round scales to float16-representable float32 values."""
    return scale.clamp(min=SCALE_FLOOR, max=65504.0).to(torch.float16).to(torch.float32)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qtype: QType
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, qmin, qmax)`` in the grouped view.

    ``x`` is grouped ``(rows, ngroups, group)``; ``scale``/``zero`` are ``(rows, ngroups)``.
    Returns codes in ``qtype.storage_dtype`` of the same grouped shape.
    """
    q = torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(qtype.qmin, qtype.qmax).to(qtype.storage_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float values ``(q - zero) * scale`` in the grouped view."""
    return (q.to(torch.float32) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qtype: QType
) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through gradient to ``x``.

    Works on any shape whose trailing dims broadcast against ``scale``/``zero``.
    """
    q = torch.clamp(torch.round(x / scale) + zero, qtype.qmin, qtype.qmax)
    xq = (q - zero) * scale
    return x + (xq - x).detach()


def group_fake_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Dynamic symmetric fake quantization per row and per ``group`` consecutive values of
    the last dimension, with a straight-through gradient to ``x``.

    Each group ``a`` becomes ``s * clamp(round(a * (qmax / max|a|)), -qmax, qmax)`` with
    ``s = max|a| / qmax`` (float32) and ``qmax = 2**(bits-1) - 1``; an all-zero group stays
    zero. At 8 bits this is the grid ONNX Runtime's ``MatMulNBits`` (``accuracy_level=4``)
    gives each block of activations before its int8 dot products.

    Example:
        >>> group_fake_quantize(torch.tensor([[1.0, -0.6, 0.0, 0.25]]), 2, 2).tolist()
        [[1.0, -1.0, 0.0, 0.25]]
    """
    k = x.shape[-1]
    if k % group:
        raise CompactnnError(f"group_size={group} does not divide the input dimension {k}.")
    qmax = (1 << (bits - 1)) - 1
    xg = x.detach().float().reshape(*x.shape[:-1], k // group, group)
    amax = xg.abs().amax(-1, keepdim=True)
    scale = amax / qmax
    # times qmax / max|a| (float32), as MLAS does, rather than divided by s: on values that
    # sit on a grid (a quantized table's rows) the two round apart on about 5% of the rows
    inverse = qmax / torch.where(amax > 0, amax, torch.ones_like(amax))
    xq = (torch.clamp(torch.round(xg * inverse), -qmax, qmax) * scale).reshape(x.shape)
    return x + (xq.to(x.dtype) - x).detach()


def tensor_dynamic_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic asymmetric fake quantization with one range for the whole tensor, taken at run
    time, with a straight-through gradient to ``x``: ONNX's ``DynamicQuantizeLinear`` at 8 bits.

    ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi - lo) / (2**bits - 1)`` (1 when
    ``hi == lo``), ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 2**bits - 1)`` and
    the value ``(q - z) * s``, all in float32 with rounding half to even (divided by ``s``, not
    multiplied by ``1 / s``: ONNX Runtime's codes, checked bit for bit in the tests).

    Example:
        >>> tensor_dynamic_fake_quantize(torch.tensor([-1.0, 0.0, 0.5, 2.0]), 2).tolist()
        [-1.0, 0.0, 0.0, 2.0]
    """
    qmax = (1 << bits) - 1
    xf = x.detach().float()
    lo, hi = xf.amin().clamp(max=0), xf.amax().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    zero = torch.round(-lo / scale)
    xq = (torch.clamp(torch.round(xf / scale) + zero, 0, qmax) - zero) * scale
    return x + (xq.to(x.dtype) - x).detach()
