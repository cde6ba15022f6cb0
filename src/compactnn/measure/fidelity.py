"""How close a compressed model's outputs are to the float model's, and how to print it.

Example:
    >>> fmt_quality("top1", 98.1), fmt_quality("cosine", -0.00123, delta=True)
    ('98.10%', '-0.0012')
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model, main_output


def first_rows(batch: Any, n: int = 1) -> Any:
    """The first ``n`` samples of a batch (tensor, tuple or dict of tensors).

    A tokenized batch (a dict with ``attention_mask``) also loses the trailing columns that
    are padding in all kept rows, as a tokenizer would pad those ``n`` texts.
    """
    if isinstance(batch, dict):
        rows = {k: v[:n] for k, v in batch.items()}
        mask = rows.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.any():
            keep = int(mask.nonzero()[:, 1].max()) + 1  # last real token column
            rows = {
                k: v[:, :keep] if isinstance(v, torch.Tensor) and v.shape == mask.shape else v
                for k, v in rows.items()
            }
        return rows
    if isinstance(batch, tuple):
        return tuple(v[:n] for v in batch)
    return batch[:n]


@torch.no_grad()
def output_fidelity(reference: nn.Module, model: nn.Module, batches: list) -> dict[str, float]:
    """Mean cosine (per sample, flattened) and SQNR in dB of ``model``'s outputs vs
    ``reference``'s on ``batches``."""
    cos, signal, noise = [], 0.0, 0.0
    for batch in batches:
        ref = main_output(call_model(reference, batch, "first")).float()
        out = main_output(call_model(model, batch, "first")).float()
        r, o = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)  # (N, D)
        cos.append(torch.nn.functional.cosine_similarity(r, o, dim=1))
        signal += float((r**2).sum())
        noise += float(((r - o) ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()
    return {"cosine": float(torch.cat(cos).mean()), "sqnr_db": sqnr}


def fmt_quality(metric: str, value: float | None, delta: bool = False) -> str:
    """``98.10%`` for top-1 (percent), ``0.9981`` for cosine; deltas get a sign and unit."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric == "top1":
        return f"{value:+.2f} pt" if delta else f"{value:.2f}%"
    return f"{value:+.4f}" if delta else f"{value:.4f}"
