"""W8A8 CPU linear layer: per-token dynamic uint8 activations x int8 weights (``torch._int_mm``).

The activation grid is that of :class:`compactnn.core.dynact.DynamicActQuantizer`
(per-token asymmetric, range including 0); the codes are computed with the same float32
operations, so the integer accumulation reproduces the simulated layer up to float32
rounding of the epilogue.

In eager PyTorch the quantization and the epilogue (zero-point correction, two scales, bias,
output cast) take several passes over ``(rows, out)`` float32 tensors and cost more than the
integer matmul at large batches. With ``fused=True`` both are compiled once per process by
``torch.compile`` (``dynamic=True``, so every row count shares one compilation) into single
loops; calls with fewer than ``FUSED_MIN_ROWS`` rows stay eager (no faster compiled), and a
compilation failure falls back to eager with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.qlayers import QuantLinear
from compactnn.errors import user_stacklevel

FUSED_MIN_ROWS = 64
_FUSED: dict[str, Callable] = {}


def dynamic_codes(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row uint8 codes of ``x2`` ``(M, K)``, shifted to int8, with scale and zero point.

    Returns:
        ``(q - 128)`` as int8 ``(M, K)``, the scale ``(M, 1)`` and the zero point ``(M, 1)``
        (float32), with ``x ~= scale * (q - zero)`` as in ``DynamicActQuantizer``.
    """
    x2 = x2.float()
    lo = x2.amin(-1, keepdim=True).clamp(max=0)  # (aminmax is much slower here)
    hi = x2.amax(-1, keepdim=True).clamp(min=0)
    sx = ((hi - lo) / 255.0).clamp(min=1e-8)
    zx = torch.round(-lo / sx)
    # clamp(round(x / s) + z, 0, 255) - 128, exact in float32 (small integers)
    q = torch.clamp(torch.round(x2 / sx) + (zx - 128), -128, 127).to(torch.int8)
    return q, sx, zx


def epilogue(
    acc: torch.Tensor,
    sx: torch.Tensor,
    zx: torch.Tensor,
    colsum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``s_x s_w (acc + (128 - z_x) colsum) + b`` in float32, cast to ``dtype``."""
    y = (acc.float() + (128 - zx) * colsum) * (sx * scale)
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled by ``torch.compile`` (once per process), or ``fn`` when that fails."""
    name = fn.__name__
    if name not in _FUSED:
        compiled = torch.compile(fn, dynamic=True)

        def call(*args):
            try:
                return compiled(*args)
            except Exception as exc:  # no compiler, unsupported platform: stay correct
                warnings.warn(
                    f"torch.compile of the W8A8 {name} failed ({type(exc).__name__}); "
                    "running it eagerly",
                    stacklevel=user_stacklevel(),
                )
                _FUSED[name] = fn
                return fn(*args)

        _FUSED[name] = call
    return _FUSED[name]


class W8A8Linear(nn.Module):
    """Per-token dynamic uint8 activations x int8 per-channel weights, int32 accumulation.

    With ``x = s_x (q_x - z_x)`` and ``w = s_w q_w``: ``y = s_x s_w (q_x' q_w^T + (128 - z_x)
    colsum(q_w))`` where ``q_x' = q_x - 128`` is int8. Quantization and epilogue run in
    float32 whatever the input dtype; the output comes back in the input's dtype.
    """

    def __init__(self, layer: QuantLinear, fused: bool = False) -> None:
        super().__init__()
        if layer.weight_spec.bits != 8 or not layer.weight_spec.symmetric:
            raise ValueError("W8A8Linear needs symmetric 8-bit weights")
        if layer.weight_scale.shape[1] != 1:
            raise ValueError("W8A8Linear needs per-channel weights")
        qt = layer.input_quantizer.qtype
        if qt.signed or qt.bits != 8:
            raise ValueError("W8A8Linear needs uint8 activations")
        wq = layer.weight_codes.to(torch.int8)
        self.register_buffer("codes_t", wq.T.contiguous())  # (in, out) int8
        self.register_buffer("colsum", wq.to(torch.int32).sum(1).float())  # (out,)
        self.register_buffer("scale", layer.weight_scale[:, 0].float().contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.fused = fused

    @property
    def weight(self) -> torch.Tensor:
        """An empty int8 tensor ``(0,)`` on the layer's device: a stand-in for model code that
        reads ``weight.dtype`` (T5's feed-forward casts its input to it unless it is int8;
        this layer takes any input dtype). Holds no values; the codes are ``codes_t``."""
        return torch.empty(0, dtype=torch.int8, device=self.codes_t.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        fuse = self.fused and x2.shape[0] >= FUSED_MIN_ROWS
        quant, epi = (
            (_fused(dynamic_codes), _fused(epilogue)) if fuse else (dynamic_codes, epilogue)
        )
        q, sx, zx = quant(x2)
        acc = torch._int_mm(q, self.codes_t)  # (M, N) int32, exact
        y = epi(acc, sx, zx, self.colsum, self.scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fused={self.fused}"
        )
