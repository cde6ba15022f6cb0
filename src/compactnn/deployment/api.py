"""``deploy``: run a compactnn w8a8 model on real integer kernels, verified on every call."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.calib import call_model, check_example, check_finite
from compactnn.core.qlayers import is_quant_layer
from compactnn.deployment.lower import lower
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import trace, unsupported_reason
from compactnn.lowering.plan import RESIDUALS, build_plan
from compactnn.lowering.verify import DEFAULT_TOLERANCE, Verification, compare, enforce

BACKENDS = ("auto", "onednn", "onnxruntime")
AUTO_CANDIDATES = ("onednn", "onnxruntime")  # "auto" times both on the example: docs/deploy.md


class DeployedModel(nn.Module):
    """An integer-kernel model: call it like the simulated model it came from.

    NaN or Inf in a floating-point input raises ``CompactnnError`` (checked on every call,
    one ``isfinite`` per input tensor): int8 kernels have no code for them and would turn
    them into confident finite logits, while the simulation returns NaN.

    Attributes:
        backend: which kernels run it (``"onednn"`` or ``"onnxruntime"``).
        verification: the check against the simulated model made at deploy time.
        selection: with ``backend="auto"``, each candidate's median seconds on the example.
        kept_float: quantized layers that stay simulated in float, with the reason.
        program: the int8 ``fx.GraphModule`` (onednn) or the ONNX session (onnxruntime).
    """

    # compactnn.save refuses it with this reason (it holds compiled kernels, not codes)
    not_saveable = (
        "a deployed model holds compiled integer kernels, not the packed codes: save the "
        "compressed model you deployed (compactnn.save(qmodel, path)), then load it and call "
        "compactnn.deploy again where it runs."
    )

    def __init__(self, program: Any, backend: str, kept_float: dict[str, str]) -> None:
        super().__init__()
        self.backend = backend
        self.kept_float = kept_float
        self.verification: Verification | None = None
        self.selection: dict[str, float] = {}  # backend -> median seconds, when "auto" chose
        if isinstance(program, nn.Module):
            self.program = program
        else:
            self._session = program

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for key, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                check_finite(value, f"deployed model input {key!r}")
        with torch.no_grad():
            if "program" in self._modules:  # an fx.GraphModule of int8 kernels
                return self.program(*args, **kwargs)
            return self._session(*args, **kwargs)  # an ONNX Runtime session


def deploy(
    qmodel: nn.Module,
    backend: str = "auto",
    *,
    example: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    residual: str = "exact",
    unsupported: str = "float",
) -> DeployedModel:
    """Lower a compactnn w8a8 model to integer kernels and check it against the simulation.

    Args:
        qmodel: a model from ``compactnn.compress(..., "w8a8")`` (any recipe whose layers
            have 8-bit inputs and per-channel weights of at most 8 bits); not modified.
        backend: ``"auto"`` (builds both backends, verifies each against the simulation
            and keeps the faster of those that pass, naming any that fails in a warning),
            ``"onednn"`` (PyTorch's oneDNN int8 kernels) or ``"onnxruntime"`` (the QDQ ONNX
            export run by ONNX Runtime; needs the ``onnx`` extra, and ``"auto"`` skips it
            with a warning when that is not installed).
        example: a sample batch (tensor, tuple or dict of tensors) the model takes;
            required. Both models run on it and the deploy fails past ``tolerance``.
        tolerance: largest allowed difference to the simulated model, in steps of the output
            scale (see :mod:`compactnn.lowering.verify`).
        residual: ``"exact"`` feeds residual adds the float value the simulation adds;
            ``"fast"`` lets them take an operand's uint8 form (less memory traffic, up to
            half a step of that operand's scale of difference).
        unsupported: ``"float"`` keeps quantized layers that have no int8 kernel simulated
            in float, with a warning naming them; ``"error"`` refuses instead.

    Returns:
        A :class:`DeployedModel` with ``verification`` set.

    Example:
        >>> qmodel = compactnn.compress(model, "w8a8", calib_data=images)  # doctest: +SKIP
        >>> fast = compactnn.deploy(qmodel, example=images[:8])           # doctest: +SKIP
        >>> print(fast.verification)                                     # doctest: +SKIP
    """
    _check_args(qmodel, backend, example, residual, unsupported)
    sim = copy.deepcopy(qmodel).eval()
    _require_int8_layers(sim)
    names = AUTO_CANDIDATES if backend == "auto" else (backend,)
    built, errors = {}, {}
    for candidate in names:
        try:
            built[candidate] = _build(candidate, sim, example, residual, unsupported)
        except CompactnnError as e:
            if len(names) == 1 or unsupported == "error":
                raise
            errors[candidate] = str(e)
    if not built:
        raise CompactnnError("deploy: no backend could run this model: " + _listing(errors))
    if errors:
        warnings.warn(f"deploy: skipped backends: {_listing(errors)}", stacklevel=2)
    checked = {k: compare(sim, m, example, f"deploy[{k}]", tolerance) for k, m in built.items()}
    passing = {k: m for k, m in built.items() if checked[k].passed}
    if not passing:  # every candidate diverges: raise with the first one's message
        enforce(next(iter(checked.values())))
    failed = {k: str(v) for k, v in checked.items() if not v.passed}
    if failed:
        warnings.warn(
            f"deploy: backends that failed verification: {_listing(failed)}", stacklevel=2
        )
    selection = _fastest(passing, example) if len(passing) > 1 else {}
    name = min(selection, key=selection.get) if selection else next(iter(passing))
    deployed = passing[name]
    deployed.selection = selection
    deployed.verification = checked[name]
    return deployed


def _build(backend: str, sim: nn.Module, example: Any, residual: str, unsupported: str):
    if backend == "onnxruntime":
        require("onnxruntime", "onnx")  # before the export module: it imports onnx
        from compactnn.export.onnx import ort_session

        session, kept = ort_session(sim, example)
        return DeployedModel(session, backend, kept)
    plan = build_plan(trace(sim), residual)
    if not plan.lowered:
        raise CompactnnError(
            "deploy found no layer it can run on int8 kernels: compress with an 8-bit "
            f"activation recipe first (e.g. 'w8a8'); kept in float: {_listing(plan.kept)}"
        )
    kept = dict(plan.kept)
    _handle_unsupported(kept, unsupported)
    return DeployedModel(lower(plan), backend, kept)


def _fastest(built: dict[str, DeployedModel], example: Any) -> dict[str, float]:
    """Median seconds per call of each candidate on ``example``.

    Each candidate runs in its own block of calls after a short pause, in three rounds of
    rotating order (shared/BENCHMARKING.md): interleaving single calls lets one runtime's
    spinning threads starve the next.
    """
    names = list(built)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for m in built.values():
            call_model(m, example)  # warm-up
        for r in range(3):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(0.01)
                for _ in range(2):
                    t0 = time.perf_counter()
                    call_model(built[k], example)
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _require_int8_layers(sim: nn.Module) -> None:
    reasons = {n: unsupported_reason(m) for n, m in sim.named_modules() if is_quant_layer(m)}
    if all(r is not None for r in reasons.values()):
        raise CompactnnError(
            "deploy found no layer it can run on int8 kernels: compress with an 8-bit "
            f"activation recipe first (e.g. 'w8a8'); kept in float: {_listing(reasons)}"
        )


def _check_args(qmodel, backend, example, residual, unsupported) -> None:
    if not isinstance(qmodel, nn.Module):
        raise CompactnnError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}.")
    if backend not in BACKENDS:
        raise CompactnnError(f"backend={backend!r} is unknown; use one of {BACKENDS}.")
    if residual not in RESIDUALS:
        raise CompactnnError(f"residual={residual!r} is unknown; use one of {RESIDUALS}.")
    if unsupported not in ("float", "error"):
        raise CompactnnError(f"unsupported={unsupported!r}: use 'float' or 'error'.")
    if example is None:
        raise CompactnnError(
            "deploy verifies the integer model against the simulated one: pass example= a "
            "sample batch the model takes (e.g. a few calibration inputs)."
        )
    check_example(example)
    if not any(is_quant_layer(m) for m in qmodel.modules()):
        raise CompactnnError(
            "qmodel has no quantized layers: run compactnn.compress(model, 'w8a8', "
            "calib_data=...) first and deploy its result."
        )
    try:
        with torch.no_grad():
            call_model(qmodel, example)
    except Exception as e:
        raise CompactnnError(f"the model does not run on example=: {e}") from e


def _listing(kept: dict[str, str]) -> str:
    return "; ".join(f"{n} ({r})" for n, r in kept.items()) or "none"


def _handle_unsupported(kept: dict[str, str], unsupported: str) -> None:
    if not kept:
        return
    if unsupported == "error":
        names = ", ".join(repr(n) for n in kept)
        raise CompactnnError(
            f"deploy cannot run these layers on int8 kernels: {_listing(kept)}. Exclude them "
            f"from quantization with the recipe's ignore list (Targets(ignore=[{names}])) or "
            "pass unsupported='float' to keep them simulated in float."
        )
    warnings.warn(f"deploy: kept in float (simulated quantization): {_listing(kept)}", stacklevel=3)
