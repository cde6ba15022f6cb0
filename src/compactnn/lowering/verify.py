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

When a check fails, :func:`layer_gap` and :func:`with_layers` say *where*: each lowered
layer's output is compared with the same value of the simulated model, in steps of that
layer's own output grid (uint8 codes) or of its float output's range, and the verification
lists the worst layers and the first one past the tolerance (the likely cause: a gap that
starts there propagates to every later layer), and the probes of
:mod:`compactnn.lowering.probes` say how far the simulated model moves *from itself* under
perturbations of float-rounding size: its input scaled or nudged per value by one part in a
million, and (the probe that matters) every activation quantizer's input nudged by a few
float ulps, as a deployment's different float summation order does. Some networks
(random-weight MobileNetV2, EfficientNet-B0, ...) amplify a one-code rounding flip from
layer to layer, and a deployment that computes every layer's integer math exactly still
differs by many steps at the output. A failed check whose gap is no larger than the
simulation's own movement under float rounding, with a top-1 agreement no worse than the
simulation's with itself there, is accepted as *within the simulation's own rounding
variation* (:attr:`Verification.within_rounding`); otherwise the message says which probe
moved how far instead of blaming the kernels. Such a gap is still refused unless every
kernel, run alone on the simulation's own inputs, matches its simulated layer
(:mod:`compactnn.lowering.isolated`; :attr:`Verification.isolated`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import grid_codes

# Steps of the output scale. Small networks match within one step (tested); on deep ones
# (ResNet-18: 21 quantized layers) float rounding in the *simulation's* convolutions flips
# an activation code here and there, and the flips add up to about 1.0-1.3 steps. ONNX
# Runtime running the very same QDQ graph shows the same gap. A lowering bug shows up as
# tens of steps.
DEFAULT_TOLERANCE = 2.0
WORST_LAYERS = 5  # layers a failed verification lists
# The relative nudge of :func:`~compactnn.lowering.probes.sensitivity`: float32 rounding is
# ~6e-8, so 1e-6 moves an input value across a code boundary only where it already sits
# within a millionth of one.
NUDGE = 1e-6
# The float-rounding probe: each activation quantizer's input times ``1 + e``, ``e`` of random
# sign and ROUNDING_ULPS ulps of its float type (4 * 2**-23 = 4.8e-7 for float32: a different
# summation order in a convolution moves its result by a few ulps), drawn ROUNDING_DRAWS times
# (seeds 0, 1) and the worst taken. Measured on random-weight torchvision CNNs (w8a8, 32
# digits at 64x64; oneDNN gap in brackets): MobileNetV3-small 20.1 steps (11.4; at 1-2 ulps
# only 9.7), EfficientNet-B0 45.3 (13.3), ShuffleNetV2 51.8 (14.8), RegNetX-400MF 31.7 (16.2);
# mnist-cnn 0.14 (0.0).
ROUNDING_ULPS = 4
ROUNDING_DRAWS = 2
INPUT_SCALE, INPUT_NUDGE, FLOAT_ROUNDING = "input scale", "input nudge", "float rounding"
ACCEPTED = (
    "accepted: every kernel matches the simulation on its own inputs; the output gap is the "
    "network's amplification of float rounding"
)


@dataclass(frozen=True)
class LayerGap:
    """How far one lowered layer's output is from the simulated model's, in steps.

    Attributes:
        name: the simulated model's layer (module name).
        steps: the largest absolute difference, in steps of ``step``.
        step: the grid step: the layer's uint8 output scale, or ``(max - min) / 255`` of the
            simulated float output.
        form: ``"uint8"`` (codes compared) or ``"float"``.
        order: position of the layer in the forward pass (0 = first).
    """

    name: str
    steps: float
    step: float
    form: str
    order: int

    def __str__(self) -> str:
        return f"{self.name} {self.steps:.3g} steps ({self.form})"


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
    layers: tuple[LayerGap, ...] = ()  # set on failure: the worst layers, worst first
    first_past_tolerance: str = ""  # earliest layer in the forward pass beyond ``tolerance``
    # set on failure: :func:`~compactnn.lowering.probes.sensitivity` of the reference, and the
    # probe that gave it (:func:`~compactnn.lowering.probes.probes`)
    sensitivity: float | None = None
    sensitivity_probe: str = ""
    # set on failure: steps the reference moves from itself under the float-rounding probe
    # (worst draw), and its worst top-1 agreement with itself there
    rounding_steps: float | None = None
    rounding_agreement: float | None = None
    input_scale_steps: float | None = None  # set on failure: the other two probes
    input_nudge_steps: float | None = None
    # set on failure: the gap is within the simulation's own rounding variation
    # (:func:`~compactnn.lowering.probes.explained`); still a failure (see :func:`enforce`)
    within_rounding: bool = False
    # ONNX paths: steps the int32 biases of the file move the output from the simulation
    bias_rounding_steps: float | None = None
    # what the candidate was measured against, when not the simulated model (export_onnx:
    # "its QDQ file", the int32 biases then being measured apart)
    reference: str = ""
    # set on a failed oneDNN check: its kernels run alone, the first that fails (layer, how
    # far), and the gap accepted (:func:`compactnn.lowering.isolated.with_kernels`)
    kernels_checked: int | None = None
    kernel_failure: str = ""
    kernel_detail: str = ""
    isolated: bool = False

    @property
    def bias_rounded(self) -> bool:
        """Whether the int32 biases of an ONNX file alone move the output at least half this
        gap from the simulation (measured against the simulation): the gap is theirs."""
        return (
            not self.reference
            and self.bias_rounding_steps is not None
            and self.bias_rounding_steps >= 0.5 * self.max_diff_steps
        )

    @property
    def amplified(self) -> bool:
        """Whether the simulated model moves at least half this gap from itself under one of
        its probes (:func:`~compactnn.lowering.probes.sensitivity`): the gap is likely the
        network's."""
        return self.sensitivity is not None and self.sensitivity >= 0.5 * self.max_diff_steps

    @property
    def passed(self) -> bool:
        within = self.nonfinite_mismatches == 0 and self.max_diff_steps <= self.tolerance
        return within or self.isolated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _moves(self) -> str:
        """Each probe's steps, largest (the one that gave ``sensitivity``) first."""
        top1 = self.rounding_agreement
        top1 = "" if top1 is None else f", top-1 agreement with itself {top1:.1%}"
        named = [
            (
                self.rounding_steps,
                f"under float rounding (each activation quantizer's input times 1 +- "
                f"{ROUNDING_ULPS} ulps, worst of {ROUNDING_DRAWS} draws{top1})",
            ),
            (self.input_nudge_steps, f"when each input value is scaled by 1 +- {NUDGE:g}"),
            (self.input_scale_steps, f"when its input is scaled by 1 + {NUDGE:g}"),
        ]
        parts = sorted(((v, how) for v, how in named if v is not None), key=lambda p: -p[0])
        if not parts:  # a sensitivity set by hand
            parts = [(self.sensitivity, named[2][1])]
        return ", ".join(f"{v:.3g} steps {how}" for v, how in parts)

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
        where = ""
        if self.layers:
            where = "; worst layers: " + ", ".join(str(g) for g in self.layers)
            if self.first_past_tolerance:
                where += f"; first layer past the tolerance: {self.first_past_tolerance}"
        if self.sensitivity is not None:
            where += "; the simulated model itself moves " + self._moves()
        if self.within_rounding:
            where += (
                f"; within the simulation's own rounding variation: {self.max_diff_steps:.3g} "
                f"steps, the simulation moves {self.rounding_steps:.3g} under float rounding"
            )
        if self.kernels_checked is not None:
            where += f"; {self.kernels_checked} kernels run alone on the simulation's inputs: "
            where += f"first to fail {self.kernel_detail}" if self.kernel_failure else "all match"
        if self.isolated:
            where += f"; {ACCEPTED}"
        if self.bias_rounding_steps is not None:
            where += (
                f"; its int32 biases (as integer kernels add them) move the output "
                f"{self.bias_rounding_steps:.3g} steps from the simulation on these samples "
                "(other inputs can move more; score the delivered model on held-out data)"
            )
        against = f"against {self.reference} " if self.reference else ""
        return (
            f"{self.what}: max difference {self.max_diff_steps:.3g} steps of the output scale "
            f"{against}(step {self.output_step:.3g}, tolerance {self.tolerance:g}) on "
            f"{self.samples} samples{agree}{nonfinite}{where}"
        )


def layer_gap(
    name: str,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    grid: tuple | None,
    order: int = 0,
) -> LayerGap:
    """Difference between a simulated layer output and a lowered layer's output, in steps.

    Args:
        name: the layer's name in the simulated model.
        reference: the simulated model's float value at that point.
        candidate: the lowered layer's output: uint8 codes of ``grid``, or float.
        grid: ``(scale, zero)`` or ``(scale, zero, lo, hi)`` of ``candidate``'s uint8 codes
            (a low-bit grid holds codes ``lo..hi``); None when it is float. The
            reference is quantized on that grid (``clamp(round(x / scale) + zero, 0, 255)``)
            and the codes are compared, so one step is one code.
        order: position of the layer in the forward pass.

    Returns:
        A :class:`LayerGap`; NaN/Inf positions count as ``inf`` steps when they differ in
        kind and are otherwise left out.

    Example:
        >>> ref = torch.tensor([0.0, 1.0, 2.55])
        >>> round(layer_gap("fc", ref, torch.tensor([0.0, 1.03, 2.55]), None).steps, 3)
        3.0
        >>> layer_gap("conv", ref, torch.tensor([0, 100, 250], dtype=torch.uint8), (0.01, 0))
        LayerGap(name='conv', steps=5.0, step=0.01, form='uint8', order=0)
    """
    ref = reference.detach().float()
    if grid is not None:
        diff = (grid_codes(ref, grid) - candidate.detach().float()).abs()  # low-bit: narrower
        return LayerGap(name, float(diff.max()) if diff.numel() else 0.0, grid[0], "uint8", order)
    got = candidate.detach().float()
    if bool(nonfinite_mismatch(ref, got).any()):
        return LayerGap(name, float("inf"), float("nan"), "float", order)
    both = torch.isfinite(ref) & torch.isfinite(got)
    if not bool(both.any()):
        return LayerGap(name, 0.0, 1.0, "float", order)
    rf = ref[both]
    step = float(rf.max() - rf.min()) / 255 or 1.0
    return LayerGap(name, float((rf - got[both]).abs().max()) / step, step, "float", order)


def with_layers(result: Verification, gaps: list[LayerGap]) -> Verification:
    """``result`` with the worst few layers of ``gaps`` and the first past the tolerance.

    Example:
        >>> gaps = [LayerGap("a", 0.0, 1.0, "uint8", 0), LayerGap("b", 9.0, 1.0, "uint8", 1)]
        >>> r = Verification("deploy", 9.0, 9.0, 1.0, None, 2.0, 4)
        >>> with_layers(r, gaps).first_past_tolerance
        'b'
    """
    worst = sorted(gaps, key=lambda g: (-g.steps, g.order))[:WORST_LAYERS]
    past = [g for g in sorted(gaps, key=lambda g: g.order) if not g.steps <= result.tolerance]
    return replace(result, layers=tuple(worst), first_past_tolerance=past[0].name if past else "")


def _tensors(out: Any) -> list[torch.Tensor]:
    """Float output tensors of a model call in the order ``torch.onnx`` writes them as graph
    outputs (and ONNX Runtime returns them): depth first, a dict's values in its own order.

    Example:
        >>> [t.tolist() for t in _tensors({"z": torch.ones(1), "a": (torch.zeros(1),)})]
        [[1.0], [0.0]]
    """
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _aligned(ref: Any, got: Any, what: str) -> Any:
    """``got`` with the entries of every dict it shares with ``ref`` in ``ref``'s key order
    (outputs pair by name where both models name them, else by position).

    Example:
        >>> list(_aligned({"a": 1, "b": 2}, {"b": 3, "a": 4}, "x"))
        ['a', 'b']
    """
    if hasattr(ref, "items") and hasattr(got, "items"):
        if set(ref.keys()) != set(got.keys()):
            raise CompactnnError(
                f"{what}: its outputs are named {sorted(got.keys())}, the simulated model's "
                f"{sorted(ref.keys())}."
            )
        return {k: _aligned(ref[k], got[k], what) for k in ref.keys()}
    if isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)) and len(ref) == len(got):
        return [_aligned(r, g, what) for r, g in zip(ref, got, strict=True)]
    return got


def compare(
    reference: nn.Module,
    candidate: Callable[[Any], Any],
    example: Any,
    what: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Verification:
    """Run ``reference`` (simulated) and ``candidate`` on ``example`` and measure the gap.

    Both take ``example`` the same way (:func:`~compactnn.core.calib.call_model`): a tuple as
    positional arguments, a dict as keyword arguments, anything else as one argument. Output
    tensors pair by key where both return a dict, else by position, a dict's values in its
    own order: the order of an ONNX export's graph outputs (ONNX Runtime returns a tuple).
    """
    with torch.no_grad():
        ref_out = call_model(reference, example)
        got_out = call_model(candidate, example)
    ref, got = _tensors(ref_out), _tensors(_aligned(ref_out, got_out, what))
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
    """Raise ``CompactnnError`` when ``result`` is past its tolerance or has a NaN/Inf mismatch.

    A gap within the simulation's own rounding variation (``within_rounding``) is refused
    too, with that diagnosis and a tolerance to pass: at such amplification the output alone
    cannot tell exact kernels from a wrong one (measured on random-weight EfficientNet-B0,
    MobileNetV3, ShuffleNetV2, RegNetX: one lowered layer's output scale made 2-10% wrong moved
    the output 13.8-30.6 steps with top-1 agreement 81-100%, inside the same variation); a
    result whose kernels all passed alone (``isolated``) has passed, one that failed is named.
    """
    if result.passed:
        return result
    suggest = "" if result.nonfinite_mismatches else _tolerance(_above(result.max_diff_steps))
    if result.kernel_failure:  # a kernel wrong on its own inputs: no amplification excuses it
        raise CompactnnError(
            f"{result}: FAILED. Layer {result.kernel_failure!r} does not reproduce its simulated "
            f"layer even on the simulation's own inputs. Keep it ({_offenders(result)}) in float "
            "(--ignore NAME, compress(ignore=['name']) or a recipe's targets.ignore) and report "
            "the model."
        )
    if result.within_rounding:
        raise CompactnnError(
            f"{result}: FAILED. This network amplifies one-code rounding differences: the "
            "simulated model moves at least as far from itself when float rounding changes by "
            "a few ulps before each activation quantizer, as a deployment's float math does, so "
            "the gap is likely not a kernel error; it is refused because a wrong layer would "
            "move the output no further. Check the deployed model's accuracy on held-out data "
            f"(compactnn eval) and, if it holds, deploy with {suggest}."
        )
    if not result.passed and _agreement_too_low(result):
        raise CompactnnError(
            f"{result}: FAILED. The simulated model moves as far from itself under float "
            f"rounding, but keeps a top-1 agreement of {result.rounding_agreement:.1%} with "
            f"itself there and this model agrees with it on {result.top1_agreement:.1%}: more "
            "than rounding changes its predictions, so the integer model likely does not "
            f"reproduce the simulated one. Keep the offending layers ({_offenders(result)}) "
            "in float (--ignore NAME, compress(ignore=['name']) or a recipe's "
            "targets.ignore) and report the model."
        )
    if not result.passed and result.amplified and not result.nonfinite_mismatches:
        raise CompactnnError(
            f"{result}: FAILED. The simulated model moves at least half as far from itself "
            f"under the {result.sensitivity_probe or INPUT_SCALE} probe, so this network "
            "amplifies one-code rounding differences and the gap is likely not a kernel error. "
            "Check the deployed model's accuracy on held-out data (compactnn eval) and, if it "
            f"holds, deploy with {suggest}."
        )
    if not result.passed and result.bias_rounded and not result.nonfinite_mismatches:
        raise CompactnnError(
            f"{result}: FAILED. The int32 biases ONNX Runtime's integer kernels add (each bias "
            "rounded onto its layer's accumulator grid) make most of this gap. Deploy with "
            "backend='onednn' (--backend onednn; it adds the biases in float), or, if the "
            f"accuracy holds on held-out data (compactnn eval), with {suggest}."
        )
    if not result.passed:
        raise CompactnnError(
            f"{result}: FAILED. The integer model does not reproduce the simulated one. "
            "Raise tolerance= (--tolerance) only if this gap is acceptable for your use; "
            f"otherwise keep the offending layers ({_offenders(result)}) in float (--ignore "
            "NAME, compress(ignore=['name']) or a recipe's targets.ignore) and report the model."
        )
    return result


def _agreement_too_low(result: Verification) -> bool:
    """The gap is within the float-rounding probe's steps, not its top-1 agreement."""
    return (
        not result.nonfinite_mismatches
        and result.rounding_steps is not None
        and result.max_diff_steps <= result.rounding_steps
        and not result.within_rounding
    )


def _tolerance(steps: float) -> str:
    """A suggested tolerance, spelled for Python and for the command line (the refusals
    reach ``compactnn deploy`` users too).

    Example:
        >>> _tolerance(20.0)
        'tolerance=20 (--tolerance 20 on the command line)'
    """
    return f"tolerance={steps:g} (--tolerance {steps:g} on the command line)"


def _above(steps: float) -> float:
    """A round tolerance a little above ``steps`` (e.g. 13.3 -> 20)."""
    for t in (4, 8, 16, 20, 32, 50, 64, 100):
        if steps * 1.25 <= t:
            return float(t)
    return float(int(steps * 1.5) + 1)


def _offenders(result: Verification) -> str:
    if result.kernel_failure:
        return f"likely {result.kernel_failure!r}, the first kernel wrong on its own inputs"
    if result.first_past_tolerance:
        return f"likely {result.first_past_tolerance!r}, the first layer past the tolerance"
    if result.layers:
        return "not localised: see the worst layers above"
    return (
        "not localised: an ONNX Runtime session runs as one graph; deploy the model with "
        "backend='onednn' to see each layer's gap"
    )
