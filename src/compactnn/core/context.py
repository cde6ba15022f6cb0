"""What a method handler gets beside the model: calibration batches and bookkeeping."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import Batch, all_finite, batch_size_of, call_model, main_output
from compactnn.core.observer import NonFiniteActivation, RangeObserver
from compactnn.core.progress import bar as progress_bar
from compactnn.errors import CompactnnError, counted, user_stacklevel

MAX_SCALE = float(torch.finfo(torch.float16).max)  # scales are stored as float16


@dataclass
class CompressContext:
    """Shared state of one :func:`compactnn.compress` call.

    Attributes:
        batches: calibration batches (possibly empty).
        call_mode: how a tuple batch is passed to the model (see ``call_model``).
        seed: seed for every stochastic method.
        progress: show progress bars.
        float_layers: weight layers left in float, with the reason (reported).
        skipped: layers a step targeted but left as they were, with the step's reason (the
            reason reported for those that end in float; the step has warned already).
        folded_bn: batch-norm modules folded into their convs (needed to load).
        notes: messages for the report (fallbacks, clamps).
    """

    batches: list[Batch] = field(default_factory=list)
    call_mode: str = "auto"
    seed: int = 0
    progress: bool = True
    float_layers: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # measured facts of this run (peak memory, ...): shown to the caller, never saved, so
    # two runs of the same recipe on the same data write byte-identical artifacts
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(batch_size_of(b) for b in self.batches)

    def run(self, model: nn.Module, batch: Batch) -> Any:
        return call_model(model, batch, self.call_mode)

    def run_all(self, model: nn.Module, desc: str | None = None) -> None:
        """Run every calibration batch through ``model`` without gradients.

        This is the calibration pass (activation observers watch it), so it checks what
        flows: an observer that sees NaN/Inf, or a non-finite model output, raises
        ``CompactnnError`` naming the batch and the layer. After the pass, an observed range
        too wide for a float16 scale (mis-scaled data, e.g. inputs x1e30) raises, and one
        that collapsed to a single value warns; both name the layer.
        """
        with torch.no_grad():
            for i, b in enumerate(self.bar(self.batches, desc=desc, leave=False)):
                try:
                    out = self.run(model, b)
                except NonFiniteActivation as exc:
                    layer = _observer_layer(model, exc.observer)
                    raise CompactnnError(
                        f"calibration batch {i}, input of layer {layer}: {exc}"
                    ) from None
                if not _finite_output(out):
                    layer = first_non_finite(model, lambda m, b=b: self.run(m, b))
                    raise CompactnnError(
                        f"calibration batch {i}: the model's output holds NaN/Inf (first "
                        f"produced by layer {layer}); the inputs overflow float32 inside the "
                        "model or the model itself produces NaN. Scale the data to the range "
                        "the model was trained on."
                    )
        self._check_ranges(model)

    def _check_ranges(self, model: nn.Module) -> None:
        """Refuse activation ranges no stored scale can express; warn on zero-width ones."""
        for name, m in model.named_modules():
            observer = getattr(m, "observer", None)
            if not isinstance(observer, RangeObserver) or observer.min is None:
                continue
            lo, hi = float(observer.min), float(observer.max)
            step = _step_of(m, lo, hi)
            if step > MAX_SCALE:
                raise CompactnnError(
                    f"layer {_layer_of(name)!r}: its calibration inputs span [{lo:.3g}, "
                    f"{hi:.3g}], which needs a quantization step of {step:.3g}, past the "
                    f"largest storable scale ({MAX_SCALE:g}); the calibration data is likely "
                    "mis-scaled: give inputs in the range the model was trained on."
                )
            if observer.collapsed:
                self.warn(
                    f"layer {_layer_of(name)!r}: every calibration value of its input was "
                    f"{lo:g}, so its activation range has zero width; check the calibration "
                    "data (all zeros?) or keep that layer in float."
                )

    def bar(self, iterable, **kwargs):
        return progress_bar(iterable, progress=self.progress and bool(kwargs.get("desc")), **kwargs)

    def require_calibration(self, method: str, recommended: int) -> None:
        """Fail without data; warn when fewer samples than ``recommended`` are given
        (``recommended=1``: one example input is all the method reads, e.g. to trace)."""
        if not self.batches:
            enough = (
                "one sample is enough"
                if recommended <= 1
                else f"about {recommended} samples are recommended"
            )
            raise CompactnnError(
                f"{method} needs calibration data: pass calib_data= (a tensor of inputs or an "
                f"iterable of batches; {enough})."
            )
        n = self.num_samples
        if n < recommended:
            given = f"only {counted(n, 'calibration sample')} {'was' if n == 1 else 'were'}"
            self.warn(
                f"{method}: {given} given; {recommended} or more are recommended for a stable "
                "result."
            )

    def warn(self, message: str) -> None:
        """Note ``message`` for the report and warn at the user's line that called compactnn
        (e.g. their ``compactnn.compress(...)``), not at the library line that noticed."""
        self.notes.append(message)
        warnings.warn(message, stacklevel=user_stacklevel())


def _step_of(quantizer: nn.Module, lo: float, hi: float) -> float:
    """The grid step a quantizer's observed range ``[lo, hi]`` asks for (8-bit when unknown)."""
    spec = getattr(quantizer, "spec", None)
    bits, symmetric = (8, False) if spec is None else (spec.bits, spec.symmetric)
    if symmetric:
        return max(abs(lo), abs(hi)) / max(2 ** (bits - 1) - 1, 1)
    return (max(hi, 0.0) - min(lo, 0.0)) / (2**bits - 1)


def _layer_of(module_name: str) -> str:
    """``"0.input_quantizer"`` -> ``"0"``: the layer an input quantizer belongs to."""
    return module_name.removesuffix(".input_quantizer") or "(the model)"


def _observer_layer(model: nn.Module, observer: RangeObserver) -> str:
    for name, m in model.named_modules():
        if getattr(m, "observer", None) is observer:
            return repr(_layer_of(name))
    return "(unknown)"


def _finite_output(out: Any) -> bool:
    try:
        t = main_output(out)
    except TypeError:
        return True  # nothing to check
    return not t.is_floating_point() or all_finite(t)


def first_non_finite(model: nn.Module, run: Callable[[nn.Module], Any]) -> str:
    """Name (quoted) of the first leaf module whose output holds NaN/Inf under ``run(model)``.

    Only called once something went wrong: it runs the model once more with hooks.
    """
    found: list[str] = []

    def hook(name: str, out: Any) -> None:
        if not found and isinstance(out, torch.Tensor) and out.is_floating_point():
            if not bool(torch.isfinite(out).all()):
                found.append(name)

    handles = [
        m.register_forward_hook(lambda _m, _a, out, n=n: hook(n, out))
        for n, m in model.named_modules()
        if n and not any(True for _ in m.children())
    ]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return repr(found[0]) if found else "(none of its modules: a functional operation)"
