"""Layer forms the QDQ ONNX export writes that the simulation computes another way: a
convolution's padding as ONNX Runtime runs it (:func:`conv_pads`), and codebook weights as
int8 terms (:func:`codebook_terms`). Used by :class:`compactnn.export.onnx._QDQLayer`."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.lowering.graph import padding_pairs, weight_terms

PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def conv_pads(layer: nn.Module) -> tuple[list[int], tuple[list[int], str] | None]:
    """``(conv padding, F.pad arguments or None)`` spelling a convolution's padding in ops
    ONNX Runtime runs as the simulation does.

    Symmetric zero padding stays the convolution's (``"valid"`` / ``"same"`` as integers:
    ONNX Runtime refuses ``auto_pad=SAME_UPPER`` with a dilation). A ``padding_mode`` other
    than zeros (ONNX ``Pad`` reflect / edge; circular as slices, which torch.onnx writes)
    and the uneven ``"same"`` of an even kernel become an explicit pad before a padding=0
    convolution.

    Example:
        >>> conv_pads(nn.Conv2d(1, 1, 3, padding="same", dilation=2))
        ([2, 2], None)
        >>> conv_pads(nn.Conv2d(1, 1, (1, 4), padding="same", padding_mode="reflect"))
        ([0, 0], ([1, 2, 0, 0], 'reflect'))
    """
    n, pairs = len(layer.kernel_size), padding_pairs(layer)
    mode = layer.padding_mode
    if mode == "zeros" and all(a == b for a, b in pairs):
        return [a for a, _ in pairs], None
    flat = [v for pair in reversed(pairs) for v in pair]  # F.pad: last dimension first
    return [0] * n, (flat, PAD_MODES.get(mode, mode))


def codebook_terms(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A codebook weight as one or two ``(int8 codes, positive per-row scale)`` whose
    dequantized sum is the weight exactly (:func:`~compactnn.lowering.graph.weight_terms`,
    a negative scale flipped onto the codes), or None when it has no such form."""
    terms = weight_terms(layer)
    if isinstance(terms, str):
        return None
    out = []
    for codes, scale in terms:
        neg = scale < 0
        view = neg.reshape(-1, *([1] * (codes.dim() - 1)))
        if bool((codes[neg] == -128).any()):
            return None  # +128 has no int8 code
        codes = torch.where(view, -codes.to(torch.int16), codes.to(torch.int16)).to(torch.int8)
        out.append((codes, scale.abs().float().clone()))
    return out


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.reshape(-1, *([1] * (codes.dim() - 1)))
