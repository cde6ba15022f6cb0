"""XNOR-Net (Rastegari et al., 2016): binary weights and binary activations.

Weights: ``w_b = alpha * sign(w)`` with ``alpha = mean|w|`` per output filter. Activations:
``sign(x)`` with the spatial scale ``K``, the channel-mean of ``|x|`` averaged over each
kernel window, so ``conv(x, w) ~ conv(sign(x), sign(w)) * K * alpha``. Gradients of ``sign``
are straight-through where ``|x| <= 1`` (the paper's clipped STE). XNOR-Net puts a batch
norm before the sign; with batch norms folded, compactnn gives each binary layer a learned
per-channel shift before the sign instead (see :mod:`compactnn.quant.binary`).

Frozen, a binary layer stores 1-bit codes ``c = [w >= 0]`` with a per-filter codebook
``[-alpha, +alpha]``; ``sign(0) = +1`` throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.quant.qat import QATConfig, WeightExport, apply_qat, fp16
from compactnn.registry import register


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
    return SignSTE.apply(x)


def binary_weight(w: torch.Tensor) -> torch.Tensor:
    """``mean|w| * sign(w)`` per output filter; gradient through both factors (clipped STE).

    ``mean|w|`` is rounded to float16 as the artifact's codebook stores it (the gradient is
    the unrounded one's), so the frozen layer computes exactly what training computed.
    """
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    alpha = alpha + (fp16(alpha) - alpha).detach()
    return alpha * sign_ste(w)


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


class BinaryWeight(nn.Module):
    """Binary weights with a per-filter scale; 1-bit codes plus a codebook when frozen.

    Args:
        real_epochs: training epochs (counted by ``start_epoch``) during which the weights
            stay real-valued while the activations are already binary: ReActNet's first
            training stage. The last epoch always trains binary weights (when ``train`` is
            given fewer epochs than the recipe's). Outside ``train`` (no ``start_epoch``
            call) weights are binary.
    """

    spec = QuantSpec(bits=1, symmetric=False, granularity="channel")

    def __init__(self, real_epochs: int = 0) -> None:
        super().__init__()
        self.real_epochs = real_epochs
        self.real = False

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Real-valued weights during the first ``real_epochs`` epochs, binary after."""
        self.real = epoch < min(self.real_epochs, epochs - 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.real else binary_weight(w)

    def export(self, w: torch.Tensor) -> WeightExport:
        w = w.detach().float()
        alpha = w.abs().reshape(w.shape[0], -1).mean(dim=1)  # (out,)
        levels = fp16(torch.stack([-alpha, alpha], dim=-1)).reshape(-1, 1, 2)
        codes = (w >= 0).to(torch.uint8)
        ones = torch.ones(w.shape[0], 1)
        return WeightExport(codes, ones, torch.zeros_like(ones), self.spec, levels)


@dataclass(frozen=True)
class BinaryConfig(QATConfig):
    """Shared by the binary methods: 1-bit weights; 1-bit activations through a binary
    block (or, with ``a8``, LSQ activations). The default specs are those of ``w1a1-<name>``.

    Args:
        real_weight_epochs: first epochs trained with binary activations but real-valued
            weights (ReActNet's two-stage training); the weights are binarised after them.
            Must be below ``epochs``; 0 binarises weights from the start.
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(1))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(1))
    epochs: int = 6
    lr: float = 1e-3
    lr_quant: float = 1e-2
    real_weight_epochs: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).method_name or "binary"
        if not isinstance(self.real_weight_epochs, int) or not (
            0 <= self.real_weight_epochs < max(self.epochs, 1)
        ):
            raise CompactnnError(
                f"{name}: real_weight_epochs={self.real_weight_epochs!r} must be an integer in "
                f"[0, epochs={self.epochs}): the last epochs must train binary weights."
            )
        if self.weight.bits != 1:
            raise CompactnnError(f"{name} binarises weights: use w1 (e.g. w1a1-{name}).")
        if self.act is not None and self.act.bits not in (1, 8):
            raise CompactnnError(
                f"{name}: activations are binary (a1) or 8-bit (a8), not {self.act.bits} bits."
            )

    def weight_quantizer(self, layer: nn.Module, spec: QuantSpec) -> nn.Module:
        return BinaryWeight(self.real_weight_epochs)


@dataclass(frozen=True)
class XNORConfig(BinaryConfig):
    """XNOR-Net (recipe ``w1a1-xnor``).

    Defaults: 6 epochs, lr 1e-3, shift lr 1e-2, no distillation; first and last layers at
    8 bits (LSQ).
    """

    binary_block = "xnor"


register("xnor", XNORConfig, "XNOR-Net: binary weights and activations with scales")(apply_qat)
