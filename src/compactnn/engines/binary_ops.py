"""The elementwise pieces of binary networks, shared by the binary engine
(:mod:`compactnn.engines.binary`) and the methods built on it: ``sign`` with its surrogate
gradients (XNOR-Net's clipped straight-through, Bi-Real's polynomial), binary weights with a
per-filter scale, XNOR-Net's activation scale ``K`` and ReActNet's RPReLU.

``sign_pm1(0) = +1`` throughout (never 0, unlike ``torch.sign``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.engines.qat_quantizers import fp16


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (never 0, unlike ``torch.sign``)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class SignSTE(torch.autograd.Function):
    """``sign_pm1(x)`` forward; gradient ``1[|x| <= 1]`` (clipped straight-through)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign_pm1(x)`` with XNOR-Net's clipped straight-through gradient."""
    return SignSTE.apply(x)


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's ``dF/dx``: ``2 - 2|x|`` inside ``(-1, 1)``, 0 outside.

    ``F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0), 2x - x^2 (0 <= x < 1), 1 (x >= 1)``.
    """
    return torch.clamp(2 - 2 * x.abs(), min=0.0)


class ApproxSign(SignSTE):
    """``sign_pm1(x)`` forward (inherited), the polynomial approximation's derivative backward."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * approx_sign_grad(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign_pm1(x)`` with Bi-Real's polynomial gradient (also ReActNet's RSign)."""
    return ApproxSign.apply(x)


def binary_weight(w: torch.Tensor, sign_fn=None) -> torch.Tensor:
    """``mean|w| * sign(w)`` per output filter; gradient through both factors (clipped STE,
    or ``sign_fn``'s gradient).

    ``mean|w|`` is rounded to float16 as the artifact's codebook stores it (the gradient is
    the unrounded one's), so the frozen layer computes exactly what training computed.
    """
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    alpha = alpha + (fp16(alpha) - alpha).detach()
    return alpha * (sign_ste if sign_fn is None else sign_fn)(w)


def xnor_scale(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """XNOR-Net's ``K``: channel-mean |x| averaged over each kernel window of ``layer``.

    ``x``: ``(N, C, H, W)`` for a conv (returns ``(N, 1, H', W')``) or ``(..., F)`` for a
    linear layer (returns ``(..., 1)``).
    """
    a = x.abs().mean(dim=1 if isinstance(layer, nn.Conv2d) else -1, keepdim=True)
    if not isinstance(layer, nn.Conv2d):
        return a
    kh, kw = layer.kernel_size
    box = a.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
    pad = layer.padding if not isinstance(layer.padding, str) else (kh // 2, kw // 2)
    return F.conv2d(a, box, stride=layer.stride, padding=pad, dilation=layer.dilation)


def rprelu(
    y: torch.Tensor, gamma: torch.Tensor, zeta: torch.Tensor, slope: torch.Tensor, dim: int
) -> torch.Tensor:
    """ReActNet's ``PReLU(y - gamma) + zeta`` with per-channel parameters along ``dim``."""
    shape = [1] * y.dim()
    shape[dim] = -1
    z = y - gamma.reshape(shape)
    return torch.where(z >= 0, z, slope.reshape(shape) * z) + zeta.reshape(shape)


class RPReLU(nn.Module):
    """Per-channel shifted PReLU; ``dim``: the channel dimension (1 for convs, -1 for linear)."""

    def __init__(self, channels: int, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.zeta = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return rprelu(y, self.gamma, self.zeta, self.slope, self.dim)
