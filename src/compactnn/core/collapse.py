"""A compressed model whose output is the same for every sample while its float model's varies
(collapsed to one code): the warning's test and words, shared by compress, deploy, eval and the
ONNX export (:mod:`compactnn.measure.fidelity` re-exports them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model, main_output


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
