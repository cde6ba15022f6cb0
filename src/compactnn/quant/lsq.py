"""LSQ: learned step size quantization (Esser et al., 2020).

``v_hat = clamp(round(v / s), Qn, Qp) * s`` with the step ``s`` learned, and the step's
gradient scaled by ``1 / sqrt(N * Qp)``. Weights: symmetric signed grid per output channel,
step initialised by the MSE-optimal clip. Activations: per tensor, unsigned after ReLU and
signed otherwise, step initialised to ``2 mean|x| / sqrt(Qp)``.

The quantizers themselves (:class:`~compactnn.engines.qat_quantizers.LSQWeight`,
:class:`~compactnn.engines.qat_quantizers.LSQAct`, with the gradients written out) live in
the training-aware engine: it also gives them to first and last layers at raised bits and
uses LSQ activations by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import LSQWeight
from compactnn.registry import register


@dataclass(frozen=True)
class LSQConfig(QATConfig):
    """LSQ for weights (per channel, signed) and activations (per tensor).

    Defaults (recipe ``w2a2-lsq``): 4 epochs, lr 1e-3, step lr 1e-3, distillation 0.5 at
    T=4 from the float model; first and last layers at 8 bits.
    """

    epochs: int = 4
    distill: float = 0.5


def lsq_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: LSQConfig) -> nn.Module:
    """Engine hook: a learned step per output channel (activations: the engine's LSQ)."""
    return LSQWeight(layer.weight, spec.bits)


register("lsq", LSQConfig, "LSQ: learned step size QAT for weights and activations")(
    QATMethod(lsq_weight_quantizer)
)
