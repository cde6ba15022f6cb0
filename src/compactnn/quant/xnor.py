"""XNOR-Net (Rastegari et al., 2016): binary weights and binary activations.

Weights: ``w_b = alpha * sign(w)`` with ``alpha = mean|w|`` per output filter. Activations:
``sign(x)`` with the spatial scale ``K``, the channel-mean of ``|x|`` averaged over each
kernel window, so ``conv(x, w) ~ conv(sign(x), sign(w)) * K * alpha``. Gradients of ``sign``
are straight-through where ``|x| <= 1`` (the paper's clipped STE). XNOR-Net puts a batch
norm before the sign; with batch norms folded, compactnn gives each binary layer a learned
per-channel shift before the sign instead.

The pieces (``sign_ste``, ``xnor_scale``, ``BinaryWeight``, the ``"xnor"`` block) live in
:mod:`compactnn.engines.binary`, shared with Bi-Real Net and ReActNet. Frozen, a binary
layer stores 1-bit codes ``c = [w >= 0]`` with a per-filter codebook ``[-alpha, +alpha]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from compactnn.engines.binary import BinaryConfig, binary_method
from compactnn.registry import register


@dataclass(frozen=True)
class XNORConfig(BinaryConfig):
    """XNOR-Net (recipe ``w1a1-xnor``).

    Defaults: 6 epochs but at least 600 optimizer steps, lr 5e-3, shift lr 1e-2, no
    distillation, batch norms re-estimated before freezing; first and last layers at 8 bits
    (LSQ). Measured across nets in docs/lowbit-training.md. With IR-Net's options
    (``libra_pb``, ``ede``) the weights train at ``irnet_lr`` (2e-3) instead of the default
    ``lr`` (a warning names both; recorded in the frozen model's ``extra["irnet"]``; an
    ``lr`` of your own, or ``irnet_lr=None``, is kept), and EDE shapes the weights'
    gradient only (``ede_on="weights"``).
    """

    lr: float = 5e-3
    min_steps: int = 600


register("xnor", XNORConfig, "XNOR-Net: binary weights and activations with scales")(
    binary_method("xnor")
)
