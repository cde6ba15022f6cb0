"""Each lowered kernel checked *alone*, on the simulation's own inputs.

A network that amplifies a one-code rounding flip layer by layer (random-weight
MobileNetV3, EfficientNet-B0, ShuffleNetV2, RegNetX; ``tests/lowering/_amplifying.py``)
ends many output steps away from its simulation even when every kernel computes its integer
math exactly, and a wrong layer hides in the same variation (:mod:`compactnn.lowering.verify`).
Fed the simulated model's own input to that layer (its quantized codes; the float residual
it adds), a kernel sees no amplification: its output differs from the simulated layer's
output on the same grid by at most one code, where float rounding ties fall differently,
and on few positions (measured in ``docs/deploy.md``). A wrong output scale, zero point or
channel order moves many positions by a code or more.

:func:`kernel_check` measures one kernel (a pure function of the two outputs); the
deployment runs the kernels (:func:`compactnn.deployment.localize.isolate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from compactnn.lowering.graph import grid_codes
from compactnn.lowering.probes import rounding_explains
from compactnn.lowering.verify import Verification

# A kernel fails its isolated check when any position is more than MAX_STEPS codes (or
# steps of a float output's range / 255) from the simulated layer, when its codes are off on
# average by more than MEAN_STEPS (a zero point one code off moves nearly every position by
# exactly one), or when more than OFF_FRACTION of its positions are off by half a step or
# more (float-rounding ties: measured at most 0.3% on correct kernels, docs/deploy.md).
MAX_STEPS = 1.0
MEAN_STEPS = 0.25
OFF_FRACTION = 0.02
# the last check of a deployment: its fused calls, whole model against its separate kernels
RUNNER = "the fused runner (whole model, against its graph)"


@dataclass(frozen=True)
class KernelCheck:
    """One kernel's output against the simulated layer's, both fed the simulation's input.

    Attributes:
        name: the simulated model's layer (module name).
        form: ``"uint8"`` (codes compared) or ``"float"`` (steps of the range / 255).
        max_steps: the largest absolute difference.
        mean_steps: the mean signed difference (kernel minus simulation).
        off_fraction: the share of positions at least half a step apart.
        order: position of the kernel in the forward pass (0 = first).
    """

    name: str
    form: str
    max_steps: float
    mean_steps: float
    off_fraction: float
    order: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.max_steps <= MAX_STEPS
            and abs(self.mean_steps) <= MEAN_STEPS
            and self.off_fraction <= OFF_FRACTION
        )

    def __str__(self) -> str:
        unit = "codes" if self.form == "uint8" else "steps"
        return (
            f"{self.name} ({self.form}): up to {self.max_steps:.3g} {unit} off, mean "
            f"{self.mean_steps:+.3g}, {self.off_fraction:.1%} of positions off"
        )


def kernel_check(
    name: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    grid: tuple | None,
    order: int = 0,
) -> KernelCheck:
    """Compare a kernel's output with the simulated layer's output on the same input.

    Args:
        name: the layer's name in the simulated model.
        reference: the simulated layer's float output (after the ops fused into the kernel).
        candidate: the kernel's output: uint8 codes of ``grid``, or float.
        grid: ``(scale, zero)`` or ``(scale, zero, lo, hi)`` of ``candidate``'s codes (the
            reference is quantized on it, ``clamp(round(x / scale) + zero, lo, hi)``, as the
            simulation's next quantizer does); None for a float output, compared in steps of
            the reference's range / 255.
        order: position of the kernel in the forward pass.

    Returns:
        A :class:`KernelCheck`; a NaN or Inf in either output counts as ``inf`` steps.

    Example:
        >>> ref, grid = torch.tensor([0.0, 0.5, 1.0, 2.0]), (0.01, 0)
        >>> up = kernel_check("c", ref, torch.tensor([1, 51, 101, 201]).byte(), grid)
        >>> up.max_steps, up.mean_steps, up.passed  # a zero point one code up
        (1.0, 1.0, False)
        >>> tie = torch.tensor([0, 50, 100, 200] * 99 + [0, 50, 100, 201]).byte()
        >>> kernel_check("c", ref.repeat(100), tie, grid).passed  # one rounding tie in 400
        True
    """
    ref = reference.detach().float()
    got = candidate.detach().float()
    if ref.shape != got.shape:
        raise ValueError(f"{name}: kernel output {tuple(got.shape)} != {tuple(ref.shape)}")
    if grid is not None:
        ref, form, step = grid_codes(ref, grid), "uint8", 1.0
    else:
        finite = ref[torch.isfinite(ref)]
        span = float(finite.max() - finite.min()) if finite.numel() else 0.0
        form, step = "float", span / 255 or 1.0
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())):
        return KernelCheck(name, form, float("inf"), float("inf"), 1.0, order)
    diff = (got - ref) / step
    if not diff.numel():
        return KernelCheck(name, form, 0.0, 0.0, 0.0, order)
    off = float((diff.abs() >= 0.5).float().mean())
    return KernelCheck(name, form, float(diff.abs().max()), float(diff.mean()), off, order)


def first_failure(checks: list[KernelCheck]) -> KernelCheck | None:
    """The earliest kernel in the forward pass that fails its isolated check, or None.

    Example:
        >>> ok, bad = KernelCheck("a", "uint8", 1.0, 0.0, 0.0, 0), KernelCheck("b", "uint8",
        ...     4.0, 0.5, 0.3, 1)
        >>> first_failure([bad, ok]).name
        'b'
    """
    failing = [c for c in checks if not c.passed]
    return min(failing, key=lambda c: c.order) if failing else None


def with_kernels(result: Verification, checks: list[KernelCheck] | None) -> Verification:
    """``result`` with the isolated checks of its kernels (None: they could not run alone).

    A failed ``result`` is accepted (``isolated``) when every kernel passes, there is no
    NaN/Inf mismatch, the simulated model moves at least half as far from itself under the
    float-rounding probe (:func:`~compactnn.lowering.probes.explained`), and its top-1
    agreement is no worse than the simulation's with itself there, less one sample: the gap
    is then the network's amplification of float rounding, not a kernel's error. A failing
    kernel is named (``kernel_failure``) whatever the gap.

    Example:
        >>> r = Verification("deploy[onednn]", 10.0, 1.0, 0.1, 1.0, 2.0, 16, rounding_steps=7.0,
        ...                  rounding_agreement=1.0)
        >>> with_kernels(r, [KernelCheck("c", "uint8", 1.0, 0.0, 0.0)]).passed
        True
        >>> with_kernels(r, [KernelCheck("c", "uint8", 3.0, 0.1, 0.2)]).kernel_failure
        'c'
    """
    if result.passed or checks is None:
        return result
    bad = first_failure(checks)
    result = replace(
        result,
        kernels_checked=sum(c.name != RUNNER for c in checks),
        kernel_failure=bad.name if bad else "",
        kernel_detail=str(bad) if bad else "",
    )
    kernels = bool(result.kernels_checked)  # the runner's check alone accepts nothing
    return replace(result, isolated=bad is None and kernels and rounding_explains(result, 2.0))
