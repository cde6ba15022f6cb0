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
    """A codebook weight as one or two ``(int8 codes, per-row scale)`` whose dequantized sum
    is the weight exactly (:func:`~compactnn.lowering.graph.weight_terms`), or None when it
    has no such form.

    A negative scale is flipped onto the codes (positive scales, as a quantizer writes them),
    except in a row whose codes hold -128 (+128 units: a power-of-two codebook whose levels
    span 2^7 units, INQ at 5 bits), which has no positive int8 form: that row keeps its
    negative scale. ONNX's ``DequantizeLinear`` takes any float scale, and ONNX Runtime's
    fused ``QLinearConv`` gives equal outputs with a negative per-channel scale
    (``tests/export/test_onnx_negative_scale.py``); those rows were stored float before.
    """
    terms = weight_terms(layer)
    if isinstance(terms, str):
        return None
    out = []
    for codes, scale in terms:
        rows = codes.reshape(codes.shape[0], -1)
        flip = (scale < 0) & ~(rows == -128).any(1)  # -(-128) has no int8 code
        view = flip.reshape(-1, *([1] * (codes.dim() - 1)))
        codes = torch.where(view, -codes.to(torch.int16), codes.to(torch.int16)).to(torch.int8)
        out.append((codes, torch.where(flip, -scale, scale).float().clone()))
    return out


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.reshape(-1, *([1] * (codes.dim() - 1)))


def float_layers_warning(
    qmodel: nn.Module, kept: dict[str, str], file_bytes: int, name: str
) -> str | None:
    """The warning for quantized layers the QDQ file stores as float32 weights (``kept``, from
    ``to_onnx_bytes``), naming them with the reason and their share of the file, else None.

    Example:
        >>> m = nn.Sequential(nn.Linear(256, 256))
        >>> float_layers_warning(m, {"0": "per-group weights"}, 300_000, "m.onnx")[:57]
        'ONNX m.onnx: 1 quantized layer stored as float32 weights '
    """
    if not kept:
        return None
    modules = dict(qmodel.named_modules())
    weights = [getattr(modules.get(n), "weight", None) for n in kept]
    nbytes = sum(4 * w.numel() for w in weights if isinstance(w, torch.Tensor))
    by_reason: dict[str, list[str]] = {}
    for layer, reason in kept.items():
        by_reason.setdefault(reason, []).append(layer)
    reasons = "; ".join(f"{', '.join(v[:4])}{', ...' if len(v) > 4 else ''} ({k})"
                        for k, v in by_reason.items())  # fmt: skip
    s = "" if len(kept) == 1 else "s"
    return (
        f"ONNX {name}: {len(kept)} quantized layer{s} stored as float32 weights (4 bytes per "
        f"weight, not their integer codes) and run as float ops: {reasons}. They are "
        f"{nbytes / 1024:.0f} KB, {nbytes / max(file_bytes, 1):.0%} of the "
        f"{file_bytes / 1024:.0f} KB file (compactnn.save keeps their codes)."
    )
