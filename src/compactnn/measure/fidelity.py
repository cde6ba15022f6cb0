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


def collapse_note(
    reference: torch.Tensor,
    output: torch.Tensor,
    step: float | None = None,
    *,
    quantized: bool = True,
    pruned: bool = False,
) -> str | None:
    """A one-line warning when ``output`` (N, ...) is the same for every sample while
    ``reference`` (the float model's, same shape) is not: the compressed model collapsed to
    one code, so a verification against it proves nothing; None otherwise (or N < 2).
    ``quantized`` / ``pruned``: what the recipe did, for the warning's words
    (:func:`collapse_text`).

    Example:
        >>> ref = torch.tensor([[1e-10, 3e-10], [2e-10, 1e-10]])
        >>> collapse_note(ref, torch.zeros(2, 2), step=1.0)[:59]
        "the quantized model's output is the same for all 2 samples "
        >>> collapse_note(ref, ref) is None
        True
    """
    n = output.shape[0] if output.dim() else 0
    if n < 2 or tuple(reference.shape) != tuple(output.shape):
        return None
    out, ref = output.reshape(n, -1).float(), reference.reshape(n, -1).float()
    if not bool((out == out[:1]).all()) or bool((ref == ref[:1]).all()):
        return None
    return collapse_text(n, float(ref.abs().max()), step, quantized=quantized, pruned=pruned)


PRUNE_FIX = "prune less (a smaller ratio or sparsity) or fine-tune after pruning"


def collapse_text(
    samples: int,
    biggest: float,
    step: float | None = None,
    *,
    quantized: bool = True,
    pruned: bool = False,
) -> str:
    """:func:`collapse_note`'s line for ``samples`` samples whose float outputs reach
    ``biggest`` in magnitude, on an output grid of ``step`` (None: not known). A recipe that
    only ``pruned`` (``quantized=False``) names pruning as the cause, not the quantization
    grid (nor an untrained model: pruning too much collapses a trained one too).

    Example:
        >>> collapse_text(64, 14.0, quantized=False, pruned=True)[:45]
        "the pruned model's output is the same for all"
    """
    subject = {(True, False): "pruned", (True, True): "compressed"}.get(
        (pruned, quantized), "quantized"
    )
    causes = ["pruning removed weights or channels its outputs depend on"] if pruned else []
    if quantized or not pruned:
        if step is not None and biggest < step:
            grid = (
                f"the float outputs are far smaller than one step of the output scale ({step:.3g})"
            )
        else:
            grid = "weights or activations are far smaller than one step of their quantization grid"
        causes.append(f"{grid} (e.g. a random-weight model whose activations vanish)")
    fixes = [PRUNE_FIX] if pruned else []
    fixes += ["compress a trained model"] if quantized or not pruned else []
    return (
        f"the {subject} model's output is the same for all {samples} samples while the float "
        f"model's varies (largest |output| {biggest:.3g}): the {subject} model collapsed, "
        f"likely because {', or '.join(causes)}; a verification or score against it proves "
        f"nothing: {', or '.join(fixes)}"
    )


@torch.no_grad()
def collapse_on(
    reference: nn.Module,
    model: nn.Module,
    batch: Any,
    step: float | None = None,
    *,
    quantized: bool = True,
    pruned: bool = False,
) -> str | None:
    """:func:`collapse_note` on ``batch`` run through the float ``reference`` and the
    compressed ``model`` (what compress and deploy check); None when an output is not a
    tensor."""
    ref = main_output(call_model(reference, batch, "first"))
    out = main_output(call_model(model, batch, "first"))
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    return collapse_note(ref, out, step, quantized=quantized, pruned=pruned)


class CollapseWarning(UserWarning):
    """The quantized model's output is constant over the samples (:func:`collapse_note`)."""


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
