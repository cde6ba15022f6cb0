"""A layer and the Hardswish after it (and the quantization after that) as one direct-kernel
call: MobileNetV3's 19 Hardswish layers, each otherwise a float pass and a quantization pass.

The layer runs on whichever direct kernel takes it (the 1x1 / plain convolution tiles, the
linear form of :mod:`compactnn.deployment.direct`, or the depthwise kernel of
:mod:`compactnn.deployment.depthwise`); the kernel applies the Hardswish in its epilogue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compactnn.deployment.codes import code_grid
from compactnn.deployment.depthwise import depthwise_call, depthwise_fits
from compactnn.deployment.direct import (
    plain_conv_call,
    plain_conv_fits,
    plain_linear_call,
    plain_linear_fits,
)
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear


def hardswish_fits(m: nn.Module) -> bool:
    """Whether convolution or linear layer ``m`` (float output, no post-op or residual) and the
    Hardswish after it can run as one direct kernel (:func:`plain_conv_fits`,
    :func:`depthwise_fits` or :func:`plain_linear_fits`)."""
    if isinstance(m, Int8Linear):
        return m.out is None and m.unary == "none" and plain_linear_fits(m)
    if not isinstance(m, Int8Conv2d) or m.out is not None or m.unary != "none":
        return False
    return m.accum is None and (plain_conv_fits(m) or depthwise_fits(m))


def hardswish_call(
    m: Int8Conv2d, quant: nn.Module | None, unfused: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Convolution ``m``, PyTorch's Hardswish ``(y * min(max(y + 3, 0), 6)) / 6`` and, when
    ``quant`` (a ``Quantize`` / ``QuantizeGrid``) follows, its quantization
    ``nearbyint(h / s) + z`` in one direct-kernel pass (MobileNetV3: 19 Hardswish layers, each
    a float pass and a quantization pass); ``unfused`` (the three calls) for large calls. The
    same floats and codes as the three calls."""
    grid = () if quant is None else code_grid(quant)
    if isinstance(m, Int8Linear):  # a classifier's hidden layer (MobileNetV3)
        return plain_linear_call(m, unfused, hardswish=grid)
    if plain_conv_fits(m):
        return plain_conv_call(m, unfused, hardswish=grid)
    return depthwise_call(m, unfused, hardswish=grid)
