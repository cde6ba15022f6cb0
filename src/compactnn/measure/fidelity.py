"""How close a compressed model's outputs are to the float model's, and how to print it.

Example:
    >>> fmt_quality("top1", 98.1), fmt_quality("cosine", -0.00123, delta=True)
    ('98.10%', '-0.0012')
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model, main_output
from compactnn.core.collapse import (  # noqa: F401  (re-exported: their home was here)
    PRUNE_FIX,
    CollapseWarning,
    collapse_note,
    collapse_on,
    collapse_text,
)


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


def exact_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` (N, D) with the same row of ``b``, exact at any
    scale: each row is divided by its largest magnitude first and the sums are taken in
    float64 (``F.cosine_similarity`` clamps each norm at ``eps=1e-8``, so outputs of about
    1e-10 scored 0.005 against themselves). Two all-zero rows are identical (1.0); an
    all-zero row against a nonzero one shares no direction (0.0).

    Example:
        >>> tiny = torch.tensor([[1e-10, 2e-10], [0.0, 0.0], [0.0, 0.0]])
        >>> cos = exact_cosine(tiny, torch.tensor([[1e-10, 2e-10], [0.0, 0.0], [1.0, 0.0]]))
        >>> [round(c, 9) for c in cos.tolist()]
        [1.0, 1.0, 0.0]
    """
    a, b = a.double(), b.double()
    a = a / a.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    b = b / b.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    na, nb = a.norm(dim=1), b.norm(dim=1)  # each in [1, sqrt(D)] unless the row is all zero
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(1.0)  # clamp only acts on a zero row
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0)


@torch.no_grad()
def output_fidelity(reference: nn.Module, model: nn.Module, batches: list) -> dict[str, float]:
    """Mean cosine (per sample, flattened; :func:`exact_cosine`) and SQNR in dB of
    ``model``'s outputs vs ``reference``'s on ``batches``. Warns (:class:`CollapseWarning`)
    when ``model``'s output is the same for every sample while ``reference``'s is not."""
    cos, signal, noise = [], 0.0, 0.0
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # (float row, quantized row)
    same_out, same_ref, samples, biggest = True, True, 0, 0.0
    for batch in batches:
        ref = main_output(call_model(reference, batch, "first")).float()
        out = main_output(call_model(model, batch, "first")).float()
        r, o = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)  # (N, D)
        cos.append(exact_cosine(r, o))
        signal += float((r.double() ** 2).sum())
        noise += float(((r.double() - o.double()) ** 2).sum())
        first = first or (r[:1], o[:1])
        same_out &= o.shape[1:] == first[1].shape[1:] and bool((o == first[1]).all())
        same_ref &= r.shape[1:] == first[0].shape[1:] and bool((r == first[0]).all())
        biggest = max(biggest, float(r.abs().max()) if r.numel() else 0.0)
        samples += r.shape[0]
    if samples > 1 and same_out and not same_ref:  # collapsed to one code (collapse_note)
        warnings.warn(collapse_text(samples, biggest), CollapseWarning, stacklevel=2)
    sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
    return {"cosine": float(torch.cat(cos).mean()), "sqnr_db": sqnr}


def fmt_quality(metric: str, value: float | None, delta: bool = False) -> str:
    """``98.10%`` for top-1 (percent), ``0.9981`` for cosine; deltas get a sign and unit."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if metric == "top1":
        return f"{value:+.2f} pt" if delta else f"{value:.2f}%"
    return f"{value:+.4f}" if delta else f"{value:.4f}"
