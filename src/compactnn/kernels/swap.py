"""Swap a compressed model's ``QuantLinear`` layers for real low-precision CPU kernels."""

from __future__ import annotations

import copy

from torch import nn

from compactnn.core.modules import set_module
from compactnn.core.qlayers import QuantLinear
from compactnn.kernels.linear import kernel_layer


def to_kernels(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` whose quantized linear layers run on integer CPU kernels.

    int8 weight-only, 2/3/4-bit group-wise weight-only, and W8A8 with per-token dynamic
    activations are swapped; other formats stay simulated and are listed in
    ``model._compactnn_kernels["simulated"]``. The kernel layers use the same codes, so
    outputs match the simulated model up to float summation order.

    Example:
        >>> fast = to_kernels(compactnn.compress(model, "w4-g32-gptq", calib))  # doctest: +SKIP
    """
    out = model if inplace else copy.deepcopy(model)
    swapped, simulated = {}, []
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            k = kernel_layer(m)
            if k is None:
                simulated.append(name)
            else:
                set_module(out, name, k)
                swapped[name] = type(k).__name__
    out._compactnn_kernels = {"swapped": swapped, "simulated": simulated}
    return out
