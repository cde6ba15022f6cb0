"""``deploy``: run a compactnn model on real integer kernels, verified on every call."""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any

import torch
from torch import fx, nn

from compactnn._optional import require
from compactnn.core.calib import check_finite, model_dtype, refuse_integer_inputs, to_dtype
from compactnn.core.model_input import unwrap_model, warn_hooks_not_run
from compactnn.deployment import binary, float_check
from compactnn.deployment.calling import (
    bind_inputs,
    drop_fixed,
    fixed_defaults,
    fixed_size_note,
    forward_signature,
    input_dtypes,
    input_shapes,
    positional_example,
    quiet_shape_checks,
    runs_other_sizes,
    structured_outputs,
)
from compactnn.deployment.float_check import (
    fewest_float,
    float_advice,
    float_contenders,
    passed_over,
)
from compactnn.deployment.localize import isolate, localize
from compactnn.deployment.lower import lower
from compactnn.deployment.refusals import (
    BACKENDS,
    NOT_PICKLABLE,
    check_args,
    check_backend,
    failure_reason,
    handle_unsupported,
    listing,
    no_integer_layers,
    require_int8_layers,
)
from compactnn.deployment.runner import plan_runner
from compactnn.deployment.traced import traced_through
from compactnn.errors import CompactnnError, is_out_of_memory, user_stacklevel
from compactnn.export.onnx_file import warn_if_collapsed
from compactnn.lowering.graph import trace
from compactnn.lowering.isolated import with_kernels
from compactnn.lowering.plan import build_plan
from compactnn.lowering.probes import explained
from compactnn.lowering.verify import (
    DEFAULT_TOLERANCE,
    Verification,
    compare,
    enforce,
    with_layers,
)

__all__ = ["AUTO_CANDIDATES", "BACKENDS", "DeployedModel", "deploy", "localize"]

AUTO_CANDIDATES = ("onednn", "onnxruntime")  # "auto" times both on the example: docs/deploy.md
# "inductor" is opt-in: it compiles for tens of seconds per input shape and was not the
# fastest int8 contender where measured (docs/deploy.md, bench/deploy_inductor.py)
# "auto" warns when the fastest float path beats the int8 model by more than this factor
# (a margin so that timing noise on a shared machine does not flip the advice)
# "auto" takes a form that runs any input size (oneDNN) over a fixed-size one (ONNX Runtime,
# exported at the example's size) within this factor of its time, when the model runs other
# sizes: the margin below which timing noise, not the kernels, decides (FLOAT_MARGIN's)
ANY_SIZE_MARGIN = 1.1
_LOWERED = re.compile(r"int8_\d+_(.+)")  # lower.py names a lowered layer int8_<n>_<layer>


class DeployedModel(nn.Module):
    """An integer-kernel model: call it like the simulated model it came from.

    NaN or Inf in a floating-point input raises ``CompactnnError`` (checked on every call,
    one sum per input tensor, see ``core.calib.all_finite``): int8 kernels have no code for
    them and would turn them into confident finite logits, while the simulation returns NaN.
    A floating-point input of another dtype than the model's (float64 for a float32 model)
    raises too: the kernels would quantize it and return float32, where the simulation fails.

    Attributes:
        backend: which kernels run it (``"onednn"``, ``"onnxruntime"`` or ``"inductor"``).
        verification: the check against the simulated model made at deploy time.
        selection: with ``backend="auto"``, fastest seconds per call on the example of
            each int8 candidate that passed and keeps the fewest layers float, and of the
            float paths (``"fp32-eager"``, and
            ``"fp32-onnxruntime"`` when onnxruntime is installed).
        recommendation: with ``backend="auto"``, the warning given when a float path was
            faster than the int8 model (None when the int8 model was the fastest).
        kept_float: quantized layers that stay simulated in float, with the reason.
        program: the int8 ``fx.GraphModule`` (onednn), its compiled form
            (:class:`~compactnn.deployment.inductor.InductorProgram`, inductor) or the ONNX
            session (onnxruntime).
        source: the simulated model it was deployed from (a copy; ``save_deployed`` stores
            it with its packed codes).
        example: the batch it was verified on at deploy time.
        settings: the deploy arguments that rebuild it: ``residual``, ``tolerance``,
            ``unsupported``.
        fixed: ``{name: default}`` of forward's parameters the example left unset, fixed at
            that default: a call with another value for one raises ``CompactnnError``.
    """

    # recognised by layers below deployment without importing it (kernels.swap.to_kernels)
    is_deployed = True

    # compactnn.api.save refuses it with this reason (it holds compiled kernels, not codes)
    not_saveable = (
        "a deployed model holds compiled integer kernels, not the packed codes: save it with "
        "compactnn.deployment.save_deployed(deployed, path) (the compressed model, the "
        "deployment and its verification batch; load_deployed re-deploys and re-verifies it), "
        "or save the compressed model you deployed (compactnn.save(qmodel, path))."
    )

    def __init__(self, program: Any, backend: str, kept_float: dict[str, str]) -> None:
        super().__init__()
        self.backend = backend
        self.kept_float = kept_float
        self.verification: Verification | None = None
        self.selection: dict[str, float] = {}  # contender -> median seconds ("auto")
        self.recommendation: str | None = None
        self.settings: dict[str, Any] = {}
        # plain attributes, not submodules: the source is not part of the deployed state
        self.__dict__["source"] = None
        self.__dict__["example"] = None  # the batch it was verified on
        self.__dict__["input_shapes"] = {}  # argument -> shape in example (set by deploy)
        self.__dict__["input_dtypes"] = {}  # argument -> float dtype in example (deploy)
        # the source's forward signature (set by deploy): keyword inputs become positional
        self.__dict__["signature"] = None
        # forward's parameters the example left unset, traced at their default (set by
        # deploy): a call with another value for one is refused (calling.drop_fixed)
        self.__dict__["fixed"] = {}
        self.__dict__["plan"] = None  # the oneDNN lowering plan (layer localisation)
        self.__dict__["onnx_bytes"] = None  # the QDQ ONNX model an onnxruntime one runs
        self.__dict__["onnx_file"] = None  # the same with its int8 weights (export_onnx)
        # straight-line runner of the int8 graph (same kernels, bit-identical, less Python)
        self.__dict__["_fast"] = (
            plan_runner(program) if isinstance(program, fx.GraphModule) else None
        )
        if isinstance(program, nn.Module):
            self.program = program
        else:
            self._session = program

    def __reduce_ex__(self, protocol: int):
        # pickle and torch.save: refused for every backend with the way to ship it (without
        # this, an ONNX Runtime session fails as a local function deep inside pickle)
        raise CompactnnError(NOT_PICKLABLE)

    def __deepcopy__(self, memo: dict) -> DeployedModel:
        # what deepcopy does through __reduce_ex__ for any module: an ONNX Runtime model
        # copies (the session is shared); oneDNN layers refuse (onednn.NOT_COPYABLE)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self) -> DeployedModel:
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for key, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                if (want := self.input_shapes.get(key)) is not None:
                    self._check_shape(key, tuple(value.shape), want)
                if (dtype := self.input_dtypes.get(key)) not in (None, value.dtype):
                    self._refuse_dtype(key, value.dtype, dtype)
                check_finite(value, f"deployed model input {key!r}")
        if self.fixed and self.signature is not None:  # refuse a value they cannot take
            args, kwargs = drop_fixed(self.signature, self.fixed, args, kwargs)
        elif kwargs and self.signature is not None:  # ONNX Runtime feeds inputs by position
            args, kwargs = bind_inputs(self.signature, args, kwargs)
        with torch.no_grad():
            if "program" in self._modules:  # an fx.GraphModule of int8 kernels
                return (self._fast or self.program)(*args, **kwargs)
            return self._session(*args, **kwargs)  # an ONNX Runtime session

    def _check_shape(self, key: Any, got: tuple, want: tuple) -> None:
        """Rank and channels (``(N, C, H, W)`` inputs) as in the deploy example; every size
        but the batch for ONNX Runtime, exported at the example's size. Shapes only: cheap."""
        expected = str(("N", *want[1:])).replace("'", "")
        bad_rank = len(got) != len(want)
        if bad_rank or (len(want) == 4 and got[1] != want[1]):
            what = f"rank {len(want)}" if bad_rank else f"{want[1]} channels"
            raise CompactnnError(
                f"deployed model input {key!r} has shape {got}; it was deployed for {expected} "
                f"({what}, as in its example=): pass inputs of that shape."
            )
        if self.onnx_bytes is not None and got[1:] != want[1:]:
            raise CompactnnError(
                f"deployed model input {key!r} has shape {got}; the ONNX Runtime form runs "
                f"only the size it was deployed with, {expected}: redeploy with an example= of "
                "the new size, or with backend='onednn' (any spatial size)."
            )

    def _refuse_dtype(self, key: Any, got: torch.dtype, want: torch.dtype) -> None:
        """A floating-point input of another dtype than the example's: the int8 kernels
        would quantize it and return ``want`` values, where the simulated model raises."""
        got_s, want_s = (str(d).removeprefix("torch.") for d in (got, want))
        raise CompactnnError(
            f"deployed model input {key!r} is {got_s}; it was deployed for {want_s} (the "
            f"model's dtype, which deploy casts example= to): pass {want_s} values (e.g. "
            f"x.to(torch.{want_s}))."
        )

    def verify(self, example: Any, tolerance: float | None = None) -> Verification:
        """Check this model against its simulated source on ``example``, in output steps.

        On failure the result names the diverging layers (oneDNN backend: each lowered
        layer's output against the simulated value, in steps of that layer's grid). The
        ONNX Runtime backend is measured against the simulation too, int32 biases included
        (what its integer kernels add); how much of the gap those biases make is reported
        apart (:func:`compactnn.export.onnx.verify_qdq`).

        Example:
            >>> deployed.verify(images[:8]).passed  # doctest: +SKIP
            True
        """
        if self.source is None:
            raise CompactnnError("this deployed model has no simulated source to verify with.")
        tol = self.settings.get("tolerance", DEFAULT_TOLERANCE) if tolerance is None else tolerance
        what = f"deploy[{self.backend}]"
        if self.onnx_bytes is not None:  # its int32 biases' share measured apart
            from compactnn.export.onnx import verify_qdq

            return verify_qdq(self.source, self.onnx_bytes, self, example, what, tol)
        result = compare(self.source, self, example, what, tol)
        if result.passed:
            return result
        result = with_layers(explained(result, self.source, example), localize(self, example))
        return with_kernels(result, isolate(self, example))  # oneDNN: each kernel alone

    def export_onnx(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the QDQ ONNX model this onnxruntime-backend model runs (verified at deploy)
        in its shippable form: the int8 weight codes as exported, where the session stores
        the weights of the layers ONNX Runtime runs in float dequantized (float32, about 4x
        their bytes; same numbers, ``export.onnx_graph.fold_float_outputs``). An existing
        file is replaced only with ``force=True``, and only an earlier ONNX export (anything
        else is refused, as ``compactnn export`` does).

        Example:
            >>> fast = compactnn.deploy(qmodel, "onnxruntime", example=x)  # doctest: +SKIP
            >>> fast.export_onnx("model.onnx")                             # doctest: +SKIP
        """
        if self.onnx_bytes is None:
            raise CompactnnError(
                f"this model runs on {self.backend!r}, not ONNX Runtime: deploy with "
                "backend='onnxruntime' to get its ONNX file, or write the simulated model's "
                "with compactnn.export.onnx.export_onnx(deployed.source, path, example)."
            )
        from compactnn.export.onnx_file import check_onnx_path, write_onnx

        check_onnx_path(path, force)
        write_onnx(path, self.onnx_file or self.onnx_bytes)


def deploy(
    qmodel: nn.Module,
    backend: str = "auto",
    *,
    example: Any = None,
    tolerance: float = DEFAULT_TOLERANCE,
    residual: str = "exact",
    unsupported: str = "float",
    time_float: bool = True,
) -> DeployedModel:
    """Lower a compactnn model to integer kernels and check it against the simulation.

    Args:
        qmodel: a model from ``compactnn.compress`` or ``compactnn.train`` whose layers have
            quantized inputs and weights of at most 8 bits (w8a8, w4a4, w2a4, ternary,
            powers of two, LSQ/PACT/DoReFa, binary blocks); not modified.
        backend: ``"auto"`` (builds both backends, verifies each against the simulation
            and, of those that pass, keeps the faster of those that keep the fewest quantized
            layers in float, naming any that fails or is passed over in a warning),
            ``"onednn"`` (PyTorch's oneDNN int8 kernels) or ``"onnxruntime"`` (the QDQ ONNX
            export run by ONNX Runtime; needs the ``onnx`` extra, and ``"auto"`` skips it
            with a warning when that is not installed), or ``"inductor"`` (the ``"onednn"``
            graph compiled by ``torch.compile`` once per input shape, tens of seconds each;
            needs a C++ compiler; never chosen by ``"auto"``).
        example: a sample batch (tensor, tuple or dict of tensors) the model takes;
            required. Both models run on it and the deploy fails past ``tolerance``.
        tolerance: largest allowed difference to the simulated model, in steps of the output
            scale (see :mod:`compactnn.lowering.verify`).
        residual: ``"exact"`` feeds residual adds the float value the simulation adds;
            ``"fast"`` lets them take an operand's uint8 form (less memory traffic, up to
            half a step of that operand's scale of difference).
        unsupported: ``"float"`` keeps quantized layers that have no int8 kernel simulated
            in float, with a warning naming them; ``"error"`` refuses instead.
        time_float: with ``backend="auto"``, also time the float network (the simulation
            with its quantizers off: fp32 eager, and ONNX Runtime fp32 when installed) on
            ``example`` and warn when it is faster than the int8 model (more than 10%),
            naming both times and the faster runtime; ``deployed.recommendation`` keeps the
            advice. Pass False when you time the float model yourself.

    Returns:
        A :class:`DeployedModel` with ``verification`` set.

    Example:
        >>> qmodel = compactnn.compress(model, "w8a8", calib_data=images)  # doctest: +SKIP
        >>> fast = compactnn.deploy(qmodel, example=images[:8])           # doctest: +SKIP
        >>> print(fast.verification)                                     # doctest: +SKIP
    """
    if isinstance(qmodel, nn.Module):
        qmodel = unwrap_model(qmodel, "deploying")  # torch.compile / DataParallel
        warn_hooks_not_run(qmodel, "the deployed program")
    if isinstance(qmodel, nn.Module) and (dtype := model_dtype(qmodel)) is not None:
        example = to_dtype(example, dtype)  # float64 / half: cast, as compress casts calib_data
    check_args(qmodel, backend, example, residual, unsupported, tolerance)
    refuse_integer_inputs(qmodel, example, "example=")  # uint8 pixels: the sim takes them
    sim = copy.deepcopy(qmodel).eval()
    require_int8_layers(sim)
    signature = forward_signature(sim)
    inputs = positional_example(signature, example)  # a dict example in forward order, if it maps
    names = AUTO_CANDIDATES if backend == "auto" else (backend,)
    built, errors, causes = {}, {}, []  # causes: the exceptions behind errors, for debugging
    for candidate in names:
        try:
            built[candidate] = _build(candidate, sim, inputs, residual, unsupported)
        except Exception as e:
            if is_out_of_memory(e):  # the machine, not this backend: no other will fit either
                raise
            if len(names) == 1 or (unsupported == "error" and isinstance(e, CompactnnError)):
                raise _refusal(candidate, e) from e
            errors[candidate] = failure_reason(e)
            causes.append(e)
    settings = {"residual": residual, "tolerance": tolerance, "unsupported": unsupported}
    for m in built.values():
        m.__dict__["source"] = sim
        m.__dict__["example"] = example  # save_deployed stores (up to 8 samples of) it
        m.__dict__["signature"] = signature
        m.__dict__["fixed"] = fixed_defaults(sim, example)  # load_deployed: same example
        m.__dict__["input_shapes"] = input_shapes(signature, example)
        m.__dict__["input_dtypes"] = input_dtypes(signature, example)
        m.settings = dict(settings)
    checked, passing, failed = {}, {}, {}
    for k, m in built.items():
        try:
            checked[k] = m.verify(example)
        except Exception as e:
            if is_out_of_memory(e):
                raise
            if len(names) == 1:
                raise _refusal(k, e) from e
            errors[k] = failure_reason(e)
            causes.append(e)
            continue
        if checked[k].passed:
            passing[k] = m
        elif len(names) == 1:
            raise CompactnnError(_verification_refusal(checked[k]))
        else:
            failed[k] = str(checked[k])
            errors[k] = _verification_refusal(checked[k])
    if not passing:  # every candidate failed: each one's reason
        cause = next((e for e in causes if not isinstance(e, CompactnnError)), None)
        raise CompactnnError(
            "deploy: no backend could run this model: " + _by_backend(errors)
        ) from cause
    if skipped := {k: v for k, v in errors.items() if k not in failed}:
        warnings.warn(
            f"deploy: skipped backends: {_by_backend(skipped)}", stacklevel=user_stacklevel()
        )
    if failed:
        warnings.warn(
            f"deploy: backends that failed verification: {_by_backend(failed)}",
            stacklevel=user_stacklevel(),
        )
    kept = {k: m.kept_float for k, m in passing.items()}
    eligible = fewest_float(kept)  # integer kernels before speed: float layers only if all do
    selection: dict[str, float] = {}
    if backend == "auto" and (time_float or len(eligible) > 1):
        with quiet_shape_checks():
            floats = float_contenders(sim, inputs) if time_float else {}
        contenders = {**{k: passing[k] for k in eligible}, **floats}
        selection = float_check.time_contenders(contenders, inputs)
        selection = float_check.settled(selection, contenders, inputs, eligible)
    ints = {k: v for k, v in selection.items() if k in eligible}
    name = min(ints, key=ints.get) if ints else eligible[0]
    ran = runs_other_sizes(sim, inputs) if passing[name].onnx_bytes is not None else None
    if ran is not None and (fits := _any_size(ints, passing, ints.get(name))):
        name = fits  # as fast, within the timing margin, and not tied to one input size
    deployed = passing[name].eval()  # an inference model, as every loaded model is
    deployed.selection = selection
    deployed.verification = checked[name]
    deployed.recommendation = float_advice(selection, name)
    if deployed.verification.isolated:  # passed on its kernels, not on its output gap
        warnings.warn(f"deploy: {deployed.verification}", stacklevel=user_stacklevel())
    if note := passed_over(name, kept, listing):  # a faster one kept layers float
        warnings.warn(note, stacklevel=user_stacklevel())
    if deployed.kept_float:  # the chosen backend's, not a candidate's that lost
        also = [k for k in kept if k != name]  # each keeps at least as many float (fewest_float)
        none = f"; {', '.join(also)} kept at least as many in float" * bool(also)
        warnings.warn(
            f"deploy[{name}]: kept in float (simulated quantization): "
            f"{listing(deployed.kept_float)}{none}",
            stacklevel=user_stacklevel(),
        )
    if deployed.recommendation:
        warnings.warn(deployed.recommendation, stacklevel=user_stacklevel())
    if ran is not None and deployed.onnx_bytes is not None:  # exported at the example's size
        warnings.warn(fixed_size_note(name, *ran), stacklevel=user_stacklevel())
    if isinstance(example, torch.Tensor | dict):  # a tuple: inputs, or (inputs, labels)?
        warn_if_collapsed(sim, example, deployed.verification.output_step)  # as export_onnx
    return deployed


def _any_size(ints: dict[str, float], passing: dict[str, Any], best: float | None) -> str | None:
    """The fastest timed int8 candidate that runs any input size (not an ONNX Runtime one),
    when within :data:`ANY_SIZE_MARGIN` of ``best`` seconds; else None."""
    free = {k: t for k, t in ints.items() if passing[k].onnx_bytes is None}
    if best is None or not free:
        return None
    fits = min(free, key=free.get)
    return fits if free[fits] <= best * ANY_SIZE_MARGIN else None


def _refusal(backend: str, e: Exception) -> CompactnnError:
    """``e`` as the one-line error of a single backend (kept as is when it is one)."""
    if isinstance(e, CompactnnError):
        return e
    return CompactnnError(f"deploy[{backend}]: {failure_reason(e)}")


def _verification_refusal(result: Verification) -> str:
    """Why a failed verification refuses the deployment (``enforce``'s words)."""
    try:
        enforce(result)
    except CompactnnError as e:
        return str(e)
    return str(result)  # (not reached: result failed)


def _by_backend(reasons: dict[str, str]) -> str:
    """``"onednn: <reason>; onnxruntime: <reason>"``."""
    return "; ".join(f"{k}: {v}" for k, v in reasons.items())


def _traced_float(sim: nn.Module, example: Any) -> dict[str, str]:
    """:func:`traced_through` of ``sim``; nothing when it cannot be traced (ONNX export
    does not need torch.fx)."""
    try:
        return traced_through(sim, trace(sim, example))
    except CompactnnError:
        return {}


def _build(backend: str, sim: nn.Module, example: Any, residual: str, unsupported: str):
    check_backend(backend, sim, example)
    if backend == "onnxruntime":
        require("onnxruntime", "onnx")  # before the export module: it imports onnx
        from compactnn.export.onnx import fold_float_outputs, to_onnx_bytes
        from compactnn.export.ort import ort_callable

        with quiet_shape_checks():
            data, kept = to_onnx_bytes(sim, example)
        kept = {**kept, **_traced_float(sim, example)}  # exported as float ops of their weights
        folded = fold_float_outputs(data)  # same numbers; no per-call dequantized float layers
        run = structured_outputs(ort_callable(folded), sim, example)
        deployed = DeployedModel(run, backend, kept)
        deployed.__dict__.update(onnx_bytes=folded, onnx_file=data)
        return deployed
    if backend == "inductor":
        from compactnn.deployment.inductor import compiler_missing

        reason = compiler_missing()  # before any lowering work
        if reason is not None:
            raise CompactnnError(reason)
    source, kernels = binary.pre_lower(sim, example)  # binary blocks: int8 or popcount
    plan = build_plan(trace(source, example), residual)
    if not plan.lowered and not kernels:
        raise CompactnnError(no_integer_layers(sim, plan.kept))
    kept = {**plan.kept, **traced_through(source, plan.gm)}  # float ops of their weights
    handle_unsupported(kept, unsupported)
    program = lower(plan)
    if backend == "inductor":
        from compactnn.deployment.inductor import build_inductor

        program = build_inductor(program)  # compiles on the first call per input shape
    deployed = DeployedModel(program, backend, kept)
    deployed.__dict__["plan"] = plan
    deployed.binary_kernels = kernels  # binary block -> kernel chosen (and its timings)
    return deployed
