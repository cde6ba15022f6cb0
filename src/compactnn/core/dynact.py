"""Per-token dynamic activation quantization: the grid the int8 kernels use at run time."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.qlayers import ActQuantizer
from compactnn.core.spec import QuantSpec


class DynamicActQuantizer(ActQuantizer):
    """Per-token asymmetric fake quantization with ranges taken at run time.

    Each row of the last dimension (one token) gets its own ``[min, max]`` grid, widened to
    contain 0, on ``spec.qtype`` (uint8 for ``a8``). No calibration is needed. The grid is
    meant for the ``(..., tokens, features)`` inputs of Linear layers (the W8A8 kernel's,
    ``compactnn.to_kernels``): on a convolution's ``(N, C, H, W)`` input it would give each
    row of pixels its own grid (:func:`per_token_misfits`). Its unused ``scale`` and ``zero``
    are no static grid: :attr:`is_per_token` tells lowering and deploy so.

    Example:
        >>> q = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
        >>> q(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.calibrated = True

    @property
    def is_per_token(self) -> bool:
        """True: the grid is each token's own, taken at run time (never a calibrated one)."""
        return True

    def start_observing(self) -> None:  # nothing to observe: ranges are dynamic
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        qt = self.qtype
        lo = x.detach().amin(-1, keepdim=True).clamp(max=0)
        hi = x.detach().amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (qt.qmax - qt.qmin)).clamp(min=1e-8)  # (..., 1)
        zero = torch.round(qt.qmin - lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, qt.qmin, qt.qmax)
        return x + ((q - zero) * scale - x).detach()

    def extra_repr(self) -> str:
        return f"{self.qtype.name}, per-token dynamic"


def per_token_misfits(layers: dict[str, nn.Module]) -> list[str]:
    """Names of the convolutions among ``layers`` (float or quantized): their inputs'
    last dimension is a spatial one, so a per-token grid there is one per row of pixels.

    Example:
        >>> per_token_misfits({"conv": nn.Conv2d(1, 2, 3), "fc": nn.Linear(2, 2)})
        ['conv']
    """
    return [n for n, m in layers.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def use_dynamic_act(model: nn.Module, names: list[str]) -> list[str]:
    """Swap the input quantizers of the named layers for per-token dynamic ones.

    Returns the names of the layers that had an input quantizer (and now a dynamic one).

    Example:
        >>> use_dynamic_act(model, ["fc"])  # doctest: +SKIP
        ['fc']
    """
    done = []
    for n in names:
        layer = model.get_submodule(n)
        if getattr(layer, "input_quantizer", None) is not None:
            layer.input_quantizer = DynamicActQuantizer(layer.input_quantizer.spec)
            done.append(n)
    return done
