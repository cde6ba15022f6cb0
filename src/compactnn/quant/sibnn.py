"""Sparsity-inducing binarized networks (Wang et al., AAAI 2020; TNNLS 2022).

Activations are binarised to ``{0, 1}`` instead of ``{-1, +1}``: with ``u = x - theta`` (the
block's learned per-channel threshold, compactnn's shift), ``a = 1[u >= 0]``, a 1-bit
ReLU whose zeros make the activations sparse. The backward function is trainable: the
gradient is that of the surrogate (``delta > 0`` learned per channel, ``rho`` fixed)::

    s(u) = clip((u + delta) / (2 delta), 0, 1) + rho * max(u - delta, 0) / (2 delta)

    ds/du     = 1 / (2 delta) (|u| < delta),  rho / (2 delta) (u > delta),  0 (u < -delta)
    ds/ddelta = -u / (2 delta^2) (|u| < delta),  -rho u / (2 delta^2) (u > delta),  0 else

so ``delta`` sets how wide a band around the threshold passes gradient (and is itself
learned: the band narrows or widens where that lowers the loss), and ``rho`` lets some
gradient through the activated neurons, as the paper's ``rho`` does. ``theta`` gets
``-ds/du``. The ``+-1`` arm uses ``2 a - 1`` with ``2 s - 1``; the STE arm the clipped
straight-through ``1[|u| <= 1] / 2`` (``{0, 1}``) or ``1[|u| <= 1]`` (``+-1``). ``delta``
starts at each channel's standard deviation of ``u`` on the calibration data.

The exact backward formula of the paper was not available here; the surrogate above is
this toolkit's reading of "trainable thresholds in the backward function" with ``rho``.
Weights are the XNOR binary weights (``mean|w| sign(w)`` per filter) in an ``"xnor"``
block (see :mod:`compactnn.engines.binary`).

Deployment: ``sum_i a_i w_i = 1/2 sum_i (2 a_i - 1) w_i + 1/2 sum_i w_i`` (inside the
zero-padded border), so a ``{0, 1}`` block could run on the ``+-1`` popcount kernel plus a
per-position bias. :mod:`compactnn.deployment.binary` instead runs it on the uint8 (zero
point 128) integer convolution and deploys it exactly; ``backend="popcount"`` is refused.

Only ``a1`` recipes (``w1a1-sibnn``): with 8-bit or no activation quantization the blocks
would train plain binary weights without the ``{0, 1}`` activations, so those are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.binary import (
    BinaryBlock,
    BinaryConfig,
    BinaryWeight,
    make_block,
    register_block_act,
)
from compactnn.engines.qat import QATMethod
from compactnn.errors import CompactnnError
from compactnn.registry import register

LEVELS = ("01", "pm1")
BACKWARDS = ("trainable", "ste")


def sparse_surrogate(u: torch.Tensor, delta: torch.Tensor, rho: float) -> torch.Tensor:
    """``s(u) = clip((u + delta) / (2 delta), 0, 1) + rho max(u - delta, 0) / (2 delta)``."""
    return torch.clamp((u + delta) / (2 * delta), 0.0, 1.0) + rho * torch.relu(u - delta) / (
        2 * delta
    )


def binary_act(
    u: torch.Tensor, delta: torch.Tensor | None, rho: float, levels: str = "01"
) -> torch.Tensor:
    """``1[u >= 0]`` (``levels="01"``) or ``2 1[u >= 0] - 1`` (``"pm1"``) forward; the
    gradient of ``sparse_surrogate`` (``delta`` given) or the clipped STE (``delta=None``)."""
    hard = (u >= 0).to(u.dtype)
    if delta is None:
        soft = torch.clamp((u + 1) / 2, 0.0, 1.0)
    else:
        soft = sparse_surrogate(u, delta, rho)
    a = hard + (soft - soft.detach())
    return a if levels == "01" else 2 * a - 1


class SparseAct(nn.Module):
    """The activation of a sparsity-inducing binary block (input: ``u = x - theta``).

    Args:
        channels: input channels of the block's layer.
        conv: channel dimension 1 (conv) rather than the last (linear).
        levels: ``"01"`` or ``"pm1"``.
        backward: ``"trainable"`` (learned ``delta``) or ``"ste"``.
        rho: gradient fraction through activated neurons (trainable backward).
    """

    def __init__(
        self, channels: int, conv: bool, levels: str = "01", backward: str = "trainable",
        rho: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.conv, self.levels, self.backward, self.rho = conv, levels, backward, rho
        self.delta = nn.Parameter(torch.ones(channels))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.reshape(1, -1, *([1] * (ndim - 2))) if self.conv else t

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if not bool(self.ready):  # first call (calibration): delta = per-channel std of u
            with torch.no_grad():
                dims = [d for d in range(u.dim()) if d != (1 if self.conv else u.dim() - 1)]
                std = u.detach().std(dim=dims) if u.numel() > u.shape[dims[0]] else None
                if std is not None:
                    self.delta.copy_(std.clamp(min=1e-3))
                self.ready.fill_(True)
        if self.backward == "ste":
            return binary_act(u, None, self.rho, self.levels)
        delta = self._view(self.delta.clamp(min=1e-4), u.dim())
        return binary_act(u, delta, self.rho, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, backward={self.backward}, rho={self.rho}"


register_block_act("sibnn")(SparseAct)


@dataclass(frozen=True)
class SIBNNConfig(BinaryConfig):
    """Sparsity-inducing BNN (recipe ``w1a1-sibnn``): XNOR blocks with ``{0, 1}``
    activations and the trainable backward.

    Defaults: 6 epochs, lr 1e-3 (``w1a1-xnor`` moved to 3e-3 and 600 steps; SIBNN was
    measured at these), threshold and ``delta`` lr 1e-2, the blocks' batch-norm statistics
    re-estimated before freezing;
    ``levels="01"``, ``backward="trainable"``, ``rho=0`` (measured: 0.5 and 1 lose 0.9 and 25
    points on mnist-cnn in 2 epochs, docs/lowbit-training.md).

    Args:
        levels: ``"01"`` (sparse) or ``"pm1"`` (XNOR's ``+-1``, for the ablation).
        backward: ``"trainable"`` (learned ``delta``) or ``"ste"`` (clipped STE).
        rho: gradient fraction through activated neurons, in [0, 1].
    """

    levels: str = "01"
    backward: str = "trainable"
    rho: float = 0.0
    irnet_lr: float | None = None  # Libra-PB on request keeps SIBNN's lr (measured at 1e-3)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels not in LEVELS:
            raise CompactnnError(f"sibnn: levels={self.levels!r}; use one of {LEVELS}.")
        if self.backward not in BACKWARDS:
            raise CompactnnError(f"sibnn: backward={self.backward!r}; use one of {BACKWARDS}.")
        if not 0.0 <= self.rho <= 1.0:
            raise CompactnnError(f"sibnn: rho={self.rho} must lie in [0, 1].")
        if self.ede:
            raise CompactnnError("sibnn has its own backward: set ede=False.")
        if self.act is None or self.act.bits != 1:
            raise CompactnnError(zero_one_message(self.act.bits if self.act else None))


def zero_one_message(act_bits: int | None) -> str:
    """The refusal of a sibnn recipe whose activations are not 1-bit (``act_bits``; None:
    weight-only), naming recipes that do what it asked for.

    Example:
        >>> zero_one_message(8)[:61]
        'sibnn quantizes activations to {0, 1}, so it takes a1, not a8'
    """
    if act_bits is None:
        got = "none (a weight-only recipe)"
        other = "binary weights alone w1-elq / w1-xnor (w1a8-xnor with 8-bit activations)"
    else:
        got, other = f"a{act_bits}", "binary weights with 8-bit activations w1a8-elq / w1a8-xnor"
    return (
        f"sibnn quantizes activations to {{0, 1}}, so it takes a1, not {got}: use w1a1-sibnn, "
        f"or for {other}."
    )


class SIBNNWeight(BinaryWeight):
    """XNOR's binary weights, carrying the block's activation options."""

    def __init__(self, config: SIBNNConfig) -> None:
        super().__init__(config.real_weight_epochs, config.libra_pb, False, config.ede_t_min)
        self.act_options = {
            "kind": "sibnn", "levels": config.levels, "backward": config.backward,
            "rho": config.rho,
        }  # fmt: skip


def sibnn_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: SIBNNConfig) -> nn.Module:
    """Engine hook: binary weights that carry the activation options to the block."""
    return SIBNNWeight(config)


def sibnn_block(name: str, layer: nn.Module, weight_quantizer: nn.Module, ctx) -> BinaryBlock:
    """Engine hook: an XNOR block whose activation is :class:`SparseAct`."""
    return make_block("xnor", name, layer, weight_quantizer, ctx, weight_quantizer.act_options)


def activation_sparsity(model: nn.Module, x: torch.Tensor) -> float:
    """Fraction of zeros among the ``{0, 1}`` activations of ``model``'s binary blocks on
    ``x`` (for ``+-1`` blocks, XNOR's included: the fraction of ``-1``, the same test
    ``x - shift < 0``)."""
    zeros, total = [0], [0]

    def hook(block: BinaryBlock, args) -> None:
        xs = args[0] - block._channel_view(block.shift, args[0].dim())
        zeros[0] += int((xs < 0).sum())
        total[0] += xs.numel()

    handles = [
        m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, BinaryBlock)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return zeros[0] / max(total[0], 1)


register("sibnn", SIBNNConfig, "Sparsity-inducing BNN: {0,1} activations, trainable backward")(
    QATMethod(weight_quantizer=sibnn_weight_quantizer, block=sibnn_block)
)
