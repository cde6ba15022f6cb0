"""IR-Net's two pieces (Qin et al., CVPR 2020) for the binary engine: Libra-PB weights and
the error-decay estimator (EDE). Both are options of every binary method
(``BinaryConfig(libra_pb=True, ede=True)``; see :mod:`compactnn.engines.binary`).

**Libra-PB** (balanced, standardised weights; integer power-of-two scale), per filter::

    w_std = (w - mean(w)) / std(w)
    Q_w   = sign(w_std) << s,      s = round(log2(||w_std||_1 / n))

Balanced weights make the binary weights carry the most information (half +1, half -1), the
standardisation keeps their spread, and ``2^s`` is a shift on integer hardware. The scale is
not differentiated (as in the paper); the gradient reaches ``w`` through the standardisation.

**EDE** (error-decay estimator): the backward of ``sign`` is that of ``g(x) = k tanh(t x)``
(by default on the weights' sign only: ``ede_on="weights"``, below)::

    g'(x) = k t (1 - tanh^2(t x)),
    t = T_min * 10^(i / N * log10(T_max / T_min)),   k = max(1 / t, 1),

with the paper's ``T_min = 0.1``, ``T_max = 10``, ``i`` the epoch and ``N`` the epochs
(``BinaryConfig.ede_t_min`` defaults to 1.0 instead: measured better when fine-tuning a
trained float model for a few epochs, see docs/lowbit-training.md). Early on
(``t = 0.1``, ``k = 10``) the gradient is almost the identity (every weight and activation
is updated); at the end (``t = 10``, ``k = 1``) it is a sharp bump around 0, close to the
derivative of ``sign``. IR-Net applies it to weights and activations alike; compactnn's
default applies it to the weights only (``BinaryConfig.ede_on="weights"``; the activations
keep the block's clipped STE or Bi-Real's polynomial), chosen on a validation split of
mnist-cnn's training digits. ``ede_per_step=True`` moves ``t`` every optimizer step (``i``
the step, ``N`` all steps) instead of every epoch.

**The options' learning rate.** With either option on, the weights train at ``IRNET_LR``
(``BinaryConfig.irnet_lr``, 2e-3) instead of the method's default ``lr`` (XNOR: 5e-3); an
``lr`` of the user's own (any other value) is kept, and ``irnet_lr=None`` keeps the
default. Measured on mnist-cnn (seed 1, 630 steps, batch norms re-estimated): Libra-PB + EDE
scores 97.4 / 97.7 / 97.2 / 96.2 held-out top-1 at lr 1e-3 / 2e-3 / 3e-3 / 5e-3, while
every arm fits the training digits alike (99.6-99.9 % train top-1): the larger lr costs
held-out accuracy only (at 5e-3 each option alone costs less: Libra-PB 97.0, EDE 97.5,
plain XNOR 97.6). Replacing the default ``lr`` warns (one line on the command line, naming
both values), and the frozen model's ``extra["irnet"]`` records the ``lr`` trained at and the
recipe's (``recipe_lr``). See docs/lowbit-training.md.
"""

from __future__ import annotations

import math

import torch

from compactnn.engines.qat_quantizers import fp16

T_MIN = 0.1  # the paper's first t
T_MAX = 10.0
T_START = 1.0  # compactnn's default first t (BinaryConfig.ede_t_min)
IRNET_LR = 2e-3  # the weights' lr with the options on (BinaryConfig.irnet_lr)


def ede_t(i: int, n: int, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """EDE's ``t = T_min * 10^(i / N * log10(T_max / T_min))`` at the start of epoch (or
    optimizer step) ``i`` (0-based) of ``n``."""
    frac = min(i, n) / max(n, 1)
    return t_min * 10 ** (frac * math.log10(t_max / t_min))


class _WeightDecayGrad(torch.autograd.Function):
    """Identity forward; backward adds ``wd * w`` (the gradient of ``wd/2 ||w||^2``)."""

    @staticmethod
    def forward(ctx, w, wd: float):
        ctx.save_for_backward(w)
        ctx.wd = wd
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad + ctx.wd * w, None


def weight_decay(w: torch.Tensor, wd: float) -> torch.Tensor:
    """``w`` unchanged, with ``wd * w`` added to its gradient (an L2 term ``wd/2 ||w||^2`` on
    the latent real weights, seen by Adam like the loss's gradient); ``wd = 0``: ``w``."""
    return _WeightDecayGrad.apply(w, wd) if wd > 0 else w


def ede_grad(x: torch.Tensor, t: float) -> torch.Tensor:
    """``k t (1 - tanh^2(t x))`` with ``k = max(1/t, 1)``: EDE's derivative of ``sign``."""
    k = max(1.0 / t, 1.0)
    return k * t * (1 - torch.tanh(t * x) ** 2)


class EDESign(torch.autograd.Function):
    """``+1`` where ``x >= 0``, ``-1`` elsewhere; EDE's gradient at ``t`` backward."""

    @staticmethod
    def forward(ctx, x, t: float):
        ctx.save_for_backward(x)
        ctx.t = t
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ede_grad(x, ctx.t), None


def ede_sign(x: torch.Tensor, t: float) -> torch.Tensor:
    """``sign_pm1(x)`` with EDE's gradient at ``t``."""
    return EDESign.apply(x, t)


def libra_standardise(w: torch.Tensor) -> torch.Tensor:
    """``(w - mean) / std`` per output filter (dim 0); differentiable."""
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(dim=1, keepdim=True)
    sd = flat.std(dim=1, keepdim=True).clamp(min=1e-12)
    return ((flat - mu) / sd).reshape(w.shape)


def libra_shift(w_std: torch.Tensor) -> torch.Tensor:
    """``2^s`` per filter, ``s = round(log2(mean|w_std|))``; shape ``(out, 1, ..., 1)``."""
    m = w_std.detach().abs().reshape(w_std.shape[0], -1).mean(dim=1).clamp(min=2.0**-14)
    scale = fp16(2.0 ** torch.round(torch.log2(m)))  # a power of two: exact in float16
    return scale.reshape(-1, *([1] * (w_std.dim() - 1)))


def libra_weight(w: torch.Tensor, sign_fn) -> torch.Tensor:
    """Libra-PB's ``sign(w_std) * 2^s``; ``sign_fn`` carries the gradient (STE or EDE)."""
    w_std = libra_standardise(w)
    return sign_fn(w_std) * libra_shift(w_std)


def libra_codes_levels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen Libra-PB weights: 1-bit codes ``[w_std >= 0]`` and the per-filter codebook
    ``[-2^s, +2^s]`` of shape ``(out, 1, 2)``."""
    w_std = libra_standardise(w.detach().float())
    scale = libra_shift(w_std).reshape(-1)
    levels = torch.stack([-scale, scale], dim=-1).reshape(-1, 1, 2)
    return (w_std >= 0).to(torch.uint8), levels
