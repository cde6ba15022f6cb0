"""Does a fast MatMulNBits session keep the simulated model's outputs? (:func:`to_ort_nbits`)

``accuracy_level=4`` quantizes each block of activations to int8 before MLAS's VNNI dot
products: an extra rounding the simulated model does not have. ``accuracy_level=0`` computes
in float32 on the same dequantized weights, so it matches the simulation up to summation
order. :func:`drift` measures how far a session's output is from the simulated one and
:func:`drifted` says whether that is beyond what an exact (float32) form ever reaches.

Measured (MiniLM ``w4-g32-gptq``, 2 and 109 sentences; classifier logits and
``last_hidden_state``): level 0 relative max difference 7e-7 to 9e-7, smallest row cosine
above 1 - 1e-10; level 4 relative max difference 0.009 to 0.031, smallest row cosine 0.998 to
0.9994, and 3 of 109 classifier predictions flipped (84.40% against 87.16% top-1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from compactnn._optional import require

# beyond what float32 compute on the same weights reaches (7e-7 .. 9e-7 measured), well below
# what int8 activations cost (0.009 .. 0.031 measured)
MAX_RELATIVE_DIFF = 1e-3
MIN_ROW_COSINE = 0.9999  # level 0: above 1 - 1e-10; level 4: 0.998 .. 0.9994


def _rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` as rows to compare: ``(B, T, H)`` hidden states as one row per real token
    (``mask`` 1), anything else one row per batch item."""
    out = out.detach().double()
    if out.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(out.shape[:2]):
        return out.reshape(-1, out.shape[-1])[mask.reshape(-1).bool()]
    return out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(1, -1)


def drift(
    got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float | None]:
    """How far ``got`` (a fast session's output) is from ``ref`` (the simulated model's).

    Returns ``relative_max_diff`` (``max |got - ref| / max |ref|``), ``min_cosine`` (the
    smallest cosine over rows: tokens of hidden states, batch items otherwise) and
    ``argmax_agreement`` (share of rows with the same argmax; 2-D outputs, e.g. logits,
    else None).

    Example:
        >>> ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> drift(ref + 0.5 * torch.tensor([[0.0, 1.0], [0.0, 0.0]]), ref)["relative_max_diff"]
        0.25
    """
    a, b = _rows(got, mask), _rows(ref, mask)
    scale = b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item() if got.dim() == 2 else None
    return {
        "relative_max_diff": ((a - b).abs().max() / scale).item(),
        "min_cosine": cos.min().item(),
        "argmax_agreement": agree,
    }


def drifted(measured: dict[str, float | None]) -> str | None:
    """Why ``measured`` (from :func:`drift`) is beyond an exact form, or None when it is not.

    Example:
        >>> drifted({"relative_max_diff": 0.03, "min_cosine": 0.998, "argmax_agreement": 1.0})
        'relative max difference 0.03 > 0.001, smallest row cosine 0.99800 < 0.9999'
        >>> drifted({"relative_max_diff": 8e-7, "min_cosine": 1.0, "argmax_agreement": 1.0})
    """
    why = []
    rel, cos, agree = (measured[k] for k in ("relative_max_diff", "min_cosine", "argmax_agreement"))
    if not rel <= MAX_RELATIVE_DIFF:  # NaN drifts too
        why.append(f"relative max difference {rel:.2g} > {MAX_RELATIVE_DIFF:g}")
    if not cos >= MIN_ROW_COSINE:
        why.append(f"smallest row cosine {cos:.5f} < {MIN_ROW_COSINE:g}")
    if agree is not None and agree < 1.0:
        why.append(f"argmax agrees on {agree:.0%} of rows")
    return ", ".join(why) or None


def set_accuracy_level(path: str | os.PathLike, level: int) -> None:
    """Rewrite the ``.onnx`` file ``path`` (atomically) with every MatMulNBits node at
    ``accuracy_level=level``; its external data is neither read nor changed."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
