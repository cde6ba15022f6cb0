"""Checking a deployed or exported model against the simulated one, in output-scale steps.

The *output step* of an output tensor is the step of an 8-bit grid spanning the simulated
output's range on the sample batch, ``(max - min) / 255``: the resolution an int8 pipeline
could give that output. ``max_diff_steps`` is the largest absolute difference between the
two models divided by that step, over all output tensors.

NaN and Inf are compared by kind, never by value (a NaN difference is never larger than
anything, so a plain maximum would ignore it): a position where one model gives NaN or Inf
and the other does not, or where both are non-finite of different kinds (NaN, +Inf, -Inf),
is a *non-finite mismatch*; one of them fails the check whatever the tolerance, and
``max_diff_steps`` is then ``inf``. The step and the differences are measured on the
positions where both models are finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.errors import CompactnnError

# Steps of the output scale. Small networks match within one step (tested); on deep ones
# (ResNet-18: 21 quantized layers) float rounding in the *simulation's* convolutions flips
# an activation code here and there, and the flips add up to about 1.0-1.3 steps. ONNX
# Runtime running the very same QDQ graph shows the same gap. A lowering bug shows up as
# tens of steps.
DEFAULT_TOLERANCE = 2.0


@dataclass(frozen=True)
class Verification:
    """Outcome of one check: the worst difference, the step it is measured in, agreement."""

    what: str
    max_diff_steps: float
    max_abs_diff: float
    output_step: float
    top1_agreement: float | None
    tolerance: float
    samples: int
    nonfinite_mismatches: int = 0
    nonfinite_detail: str = ""

    @property
    def passed(self) -> bool:
        return self.nonfinite_mismatches == 0 and self.max_diff_steps <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        agree = (
            "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        )
        nonfinite = ""
        if self.nonfinite_mismatches:
            nonfinite = (
                f"; {self.nonfinite_mismatches} output value(s) are NaN/Inf in one model but "
                f"not the same in the other ({self.nonfinite_detail})"
            )
        return (
            f"{self.what}: max difference {self.max_diff_steps:.3g} steps of the output scale "
            f"(step {self.output_step:.3g}, tolerance {self.tolerance:g}) on "
            f"{self.samples} samples{agree}{nonfinite}"
        )


def _tensors(out: Any) -> list[torch.Tensor]:
    """Float output tensors of a model call, in a fixed order (tensor, tuple, dict, outputs)."""
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for _, v in sorted(out.items()) for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def compare(
    reference: nn.Module,
    candidate: Callable[[Any], Any],
    example: Any,
    what: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Verification:
    """Run ``reference`` (simulated) and ``candidate`` on ``example`` and measure the gap."""
    with torch.no_grad():
        ref = _tensors(call_model(reference, example))
        got = _tensors(candidate(example))
    if len(ref) != len(got) or not ref:
        raise CompactnnError(
            f"{what}: produced {len(got)} output tensors, the simulated model {len(ref)}."
        )
    worst, worst_abs, step_of_worst = 0.0, 0.0, 1.0
    mismatches, detail = 0, ""
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if r.shape != g.shape:
            raise CompactnnError(f"{what}: output shape {tuple(g.shape)} != {tuple(r.shape)}.")
        bad = nonfinite_mismatch(r, g)
        if bool(bad.any()):
            if not mismatches:
                at = tuple(int(j) for j in bad.nonzero()[0])
                detail = (
                    f"first in output {i} at index {at}: simulated {float(r[at])}, "
                    f"{what} {float(g[at])}"
                )
            mismatches += int(bad.sum())
        both = torch.isfinite(r) & torch.isfinite(g)
        if not bool(both.any()):
            continue
        rf = r[both]
        step = float(rf.max() - rf.min()) / 255 or 1.0
        diff = float((rf - g[both]).abs().max())
        if diff / step >= worst:
            worst, worst_abs, step_of_worst = diff / step, diff, step
    agree = None
    if ref[0].dim() == 2 and ref[0].shape[1] > 1:
        agree = float((ref[0].argmax(1) == got[0].argmax(1)).float().mean())
    return Verification(
        what,
        float("inf") if mismatches else worst,
        worst_abs,
        step_of_worst,
        agree,
        tolerance,
        int(ref[0].shape[0]),
        mismatches,
        detail,
    )


def nonfinite_mismatch(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Boolean mask: positions where NaN/Inf differ in kind between ``ref`` and ``got``.

    Example:
        >>> nan, inf = float("nan"), float("inf")
        >>> ref, got = torch.tensor([1.0, nan, inf, nan]), torch.tensor([2.0, nan, 1.0, -inf])
        >>> nonfinite_mismatch(ref, got)
        tensor([False, False,  True,  True])
    """
    nonfinite = ~torch.isfinite(ref) | ~torch.isfinite(got)
    same_kind = (torch.isnan(ref) & torch.isnan(got)) | (ref == got)  # +Inf == +Inf
    return nonfinite & ~same_kind


def enforce(result: Verification) -> Verification:
    """Raise ``CompactnnError`` when ``result`` is past its tolerance or has a NaN/Inf mismatch."""
    if not result.passed:
        raise CompactnnError(
            f"{result}: FAILED. The integer model does not reproduce the simulated one. "
            "Raise tolerance= only if this gap is acceptable for your use; otherwise keep "
            "the offending layers in float with a recipe ignore list "
            "(Targets(ignore=['name'])) and report the model."
        )
    return result
