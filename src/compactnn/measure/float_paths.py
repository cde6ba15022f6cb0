"""The fastest float path: the float baseline a speedup is quoted against.

A compressed model is only "faster" if it beats the fastest way to run the *float* model on
the same machine, measured in the same run (BENCHMARKING.md). :func:`fastest_float_path`
builds the contenders (fp32 eager, bf16 autocast, ``torch.compile`` when it compiles within
a bounded time, ONNX Runtime fp32 when ``onnxruntime`` is installed), drops any whose
outputs diverge from fp32 eager (with the reason), times the rest side by side with the
rotating-block protocol (:func:`compactnn.measure.timing.time_blocks`) and names the winner.

Example:
    >>> paths = fastest_float_path(model, images[:8], quick=True)  # doctest: +SKIP
    >>> paths.winner, paths.best.fmt()                              # doctest: +SKIP
    ('ort-fp32', '3.21 ms')
"""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compactnn.core.calib import batch_size_of, call_model, main_output
from compactnn.core.onnx_trace import export_dynamic
from compactnn.measure.timing import DEFAULT_THREADS, Timing, model_call, time_blocks

EAGER = "fp32-eager"
BF16 = "bf16-autocast"
COMPILE = "torch.compile"
ORT = "ort-fp32"
ORT_FUSED = "ort-fp32-fused"  # ONNX Runtime's transformer optimizer on the export (BERT family)
# largest max|y - y_eager| / max|y_eager| a contender may show and still count as the same
# model: fp32 paths differ by summation order only; bf16 keeps 8 mantissa bits (2^-8 = 0.4%
# per rounding) and a deep network compounds a few of them
TOLERANCE = {EAGER: 0.0, COMPILE: 1e-3, ORT: 1e-3, ORT_FUSED: 1e-3, BF16: 5e-2}
COMPILE_TIMEOUT_S = 180.0
# each contender's blocks grow to about this long (time_blocks' block_s): a model of a few
# milliseconds is timed warm, call after call, not one cold call after each pause
BLOCK_S = 0.1


@dataclass
class FloatPaths:
    """Every float contender's latency, measured side by side, and the fastest.

    Attributes:
        timings: contender name -> :class:`Timing` (only those that ran and agreed).
        skipped: contender name -> why it was not timed (not installed, did not compile in
            time, diverged from fp32 eager, failed).
        winner: the name of the fastest contender.
        errors: contender name -> max relative difference to fp32 eager.
        build_s: contender name -> seconds spent building it (export, compilation).
    """

    timings: dict[str, Timing]
    skipped: dict[str, str] = field(default_factory=dict)
    winner: str = EAGER
    errors: dict[str, float] = field(default_factory=dict)
    build_s: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> Timing:
        """The winner's timing."""
        return self.timings[self.winner]

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner,
            "timings": {k: t.to_dict() for k, t in self.timings.items()},
            "skipped": dict(self.skipped),
            "errors": dict(self.errors),
            "build_s": dict(self.build_s),
        }


def is_plain_float(model: nn.Module) -> bool:
    """True when ``model`` simulates nothing: no compactnn layer, quantizer or mask in it
    (its modules are PyTorch's, the user's or compactnn's reference models') and no weight
    parametrization. Such a model, e.g. a channel-pruned one, runs as it is on every
    float path.

    Example:
        >>> is_plain_float(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
        True
    """
    return all(is_plain_module(m) for m in model.modules())


def is_plain_module(m: nn.Module) -> bool:
    """One module of :func:`is_plain_float`'s test: PyTorch's, the user's or a reference
    model's class, with no parametrized weight."""
    origin = type(m).__module__
    plain = not origin.startswith("compactnn.") or origin.startswith("compactnn.models")
    return plain and not parametrize.is_parametrized(m)


class Bf16Autocast(nn.Module):
    """The float model run under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


class OrtFloat(nn.Module):
    """An ONNX Runtime fp32 session behind the float model's call signature (main output)."""

    def __init__(self, data: bytes, names: list[str], threads: int | None, index: int = 0) -> None:
        super().__init__()
        from compactnn.export.ort import ort_callable

        self.run = ort_callable(data, threads)
        self.names = names
        self.index = index  # which ONNX output is the eager model's main output

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.names, args, strict=False)) | kwargs
        out = self.run(**{k: v for k, v in feed.items() if k in self.names})
        return out[self.index] if isinstance(out, tuple) else out


def _flat(out: Any) -> list[Any]:
    """``out``'s tensors depth first, in the order the ONNX exporter lists its outputs (a
    mapping's values in order, then sequences in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # a Hugging Face ModelOutput is an OrderedDict too
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def main_output_index(model: nn.Module, example: Any) -> int:
    """The position of :func:`~compactnn.core.calib.main_output` among ``model``'s flattened
    outputs on ``example`` (a dict ``{"feat": f, "logits": y}`` -> 1); 0 when not found."""
    with torch.no_grad():
        out = call_model(model, example)
    main = main_output(out)
    return next((i for i, t in enumerate(_flat(out)) if t is main), 0)


# Hugging Face model types whose ONNX export ONNX Runtime's transformer optimizer fuses
# (``onnxruntime.transformers.optimizer``, model type "bert": attention, embedding + LayerNorm,
# skip + LayerNorm, bias + GELU into contrib ops). all-MiniLM-L6-v2, batch 1, 33 tokens,
# 2 threads, AMD Zen 4: 551 nodes -> 80, 5.86-6.13 -> 5.63-5.94 ms.
TRANSFORMER_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert"}


def ort_fused_file(model: nn.Module, onnx_path: Path) -> Path:
    """The export at ``onnx_path`` of Hugging Face encoder ``model`` after ONNX Runtime's
    transformer optimizer (fusions only; ONNX Runtime's own graph optimizations still run
    when the session opens), written beside it as ``<stem>-fused.onnx``. Raises ValueError
    for a model type it does not cover."""
    config = getattr(model, "config", None)
    kind = TRANSFORMER_TYPES.get(getattr(config, "model_type", None))
    if kind is None:
        raise ValueError("not a BERT-family Hugging Face model")
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None):
            fused = optimize_model(
                str(onnx_path), model_type=kind, num_heads=config.num_attention_heads,
                hidden_size=config.hidden_size, opt_level=0,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)
    out = onnx_path.with_name(onnx_path.stem + "-fused.onnx")
    fused.save_model_to_file(str(out))
    return out


def ort_float(
    model: nn.Module, example: Any, threads: int | None = None, fused: bool = False
) -> nn.Module:
    """``model`` exported to ONNX (fp32, dynamic batch) and run by ONNX Runtime; ``fused``:
    after ONNX Runtime's transformer fusions (:func:`ort_fused_file`).

    Raises whatever the exporter or ONNX Runtime raises (the caller skips the contender).
    """
    from compactnn._optional import require

    require("onnxruntime", "onnx")
    with tempfile.TemporaryDirectory(prefix="compactnn-float-") as tmp:
        path = Path(tmp) / "fp32.onnx"
        names = export_dynamic(model, example, path)
        data = (ort_fused_file(model, path) if fused else path).read_bytes()
    return OrtFloat(data, names, threads, main_output_index(model, example))


class _CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float, state: dict[str, bool]):
    """Raise :class:`_CompileTimeout` after ``seconds`` and set ``state["fired"]`` (main
    thread on Unix; else no limit). The flag matters: the alarm can fire inside
    ``torch._dynamo``, which re-raises it wrapped in its own error type."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(_signum, _frame):
        state["fired"] = True
        raise _CompileTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled(model: nn.Module, example: Any, timeout_s: float = COMPILE_TIMEOUT_S) -> nn.Module:
    """``torch.compile(model)``, compiled by one call on ``example`` within ``timeout_s``.

    Raises :class:`TimeoutError` when compilation takes longer.
    """
    fn = torch.compile(model)
    state = {"fired": False}
    # inductor imports torch's C++ build tools, which log "No CUDA runtime is found" on a
    # machine with an nvcc and no GPU: noise on every timed CPU compile
    build_log = logging.getLogger("torch.utils.cpp_extension")
    level = build_log.level
    build_log.setLevel(logging.ERROR)
    try:
        with _time_limit(timeout_s, state), torch.no_grad():
            call_model(fn, example)
    except Exception:
        if state["fired"]:  # _CompileTimeout, possibly wrapped by torch._dynamo
            raise TimeoutError(f"did not compile within {timeout_s:.0f} s") from None
        raise
    finally:
        build_log.setLevel(level)
    if state["fired"]:  # torch._dynamo swallowed the alarm and fell back to eager
        raise TimeoutError(f"did not compile within {timeout_s:.0f} s")
    return fn


def _relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    if ref.shape != out.shape:
        return float("inf")
    scale = ref.abs().max().clamp_min(1e-12)
    return float((out.float() - ref.float()).abs().max() / scale)


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def float_contenders(
    model: nn.Module,
    example: Any,
    *,
    quick: bool = False,
    compile_timeout_s: float = COMPILE_TIMEOUT_S,
    threads: int | None = DEFAULT_THREADS,
    with_ort: bool = True,
) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, float]]:
    """Build the float contenders of ``model`` (``with_ort=False`` leaves ONNX Runtime out,
    for a caller that builds its own session).

    Returns:
        ``(contenders, skipped, build_s)``: name -> callable module, name -> reason it was
        not built, name -> seconds to build it.
    """
    model = model.eval()
    contenders: dict[str, nn.Module] = {EAGER: model, BF16: Bf16Autocast(model)}
    skipped: dict[str, str] = {}
    build_s: dict[str, float] = {}
    builders = {ORT: lambda: ort_float(model, example, threads)} if with_ort else {}
    config = getattr(model, "config", None)
    if with_ort and getattr(config, "model_type", None) in TRANSFORMER_TYPES:
        builders[ORT_FUSED] = lambda: ort_float(model, example, threads, fused=True)
    if quick:
        skipped[COMPILE] = "not tried in quick mode"
    else:
        builders[COMPILE] = lambda: compiled(model, example, compile_timeout_s)
    for name, build in builders.items():
        t0 = time.perf_counter()
        try:
            contenders[name] = build()
        except ImportError as exc:
            skipped[name] = f"not installed ({_one_line(exc)})"
        except Exception as exc:  # a contender that cannot be built is a finding, not a crash
            skipped[name] = _one_line(exc)
        build_s[name] = time.perf_counter() - t0
    return contenders, skipped, build_s


def fastest_float_path(
    model: nn.Module,
    example: Any,
    *,
    quick: bool = False,
    threads: int | None = DEFAULT_THREADS,
    runs: int | None = None,
    warmup: int | None = None,
    compile_timeout_s: float = COMPILE_TIMEOUT_S,
    extra: dict[str, nn.Module] | None = None,
) -> FloatPaths:
    """Time every float path of ``model`` on ``example`` side by side; name the fastest.

    Args:
        model: the float model (not modified).
        example: one input batch (tensor, tuple or dict of tensors).
        quick: fewer runs (3 instead of 9) and no ``torch.compile`` (the demo's setting).
        threads: torch (and ONNX Runtime) threads while timing; None keeps the current.
        runs: timed calls per contender (default 3 when ``quick``, else 9).
        warmup: untimed calls per contender first (default 2; compiled models got one
            more while compiling).
        compile_timeout_s: give up on ``torch.compile`` after this long (skipped with a note).
        extra: other models to time in the same blocks (e.g. a deployed model), so their
            ratios to the float paths are measured side by side; their timings are added
            to ``timings`` but they never win.

    Returns:
        :class:`FloatPaths`.

    Example:
        >>> paths = fastest_float_path(nn.Linear(4, 4), torch.ones(2, 4), quick=True)
        >>> paths.winner in paths.timings
        True
    """
    return _race(model, example, quick, threads, runs, warmup, compile_timeout_s, extra)[0]


def fastest_float_form(
    model: nn.Module,
    example: Any,
    *,
    quick: bool = True,
    threads: int | None = DEFAULT_THREADS,
    runs: int | None = None,
) -> tuple[nn.Module, FloatPaths]:
    """The fastest float path of ``model`` as a module to run (fp32 eager: ``model``
    itself; an ONNX Runtime session; ...), and the race that chose it
    (:func:`fastest_float_path`, same arguments).

    Example:
        >>> fast, paths = fastest_float_form(nn.Linear(4, 4), torch.ones(2, 4))
        >>> paths.winner in paths.timings
        True
    """
    paths, contenders = _race(model, example, quick, threads, runs, None, COMPILE_TIMEOUT_S, None)
    return contenders[paths.winner], paths


def _race(model, example, quick, threads, runs, warmup, compile_timeout_s, extra):
    """:func:`fastest_float_path`'s result and the contenders it timed (name -> module)."""
    runs = runs or (3 if quick else 9)
    warmup = 2 if warmup is None else warmup
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        contenders, skipped, build_s = float_contenders(
            model, example, quick=quick, compile_timeout_s=compile_timeout_s, threads=threads
        )
        errors = _check_outputs(contenders, example, skipped)
    finally:
        torch.set_num_threads(previous)
    calls = {name: model_call(m, example) for name, m in contenders.items()}
    calls |= {name: model_call(m, example) for name, m in (extra or {}).items()}
    timings = time_blocks(
        calls, warmup=warmup, runs=runs, threads=threads, batch=_batch(example), block_s=BLOCK_S
    )
    floats = [name for name in contenders if name in timings]
    winner = min(floats, key=lambda n: timings[n].median_s)
    return FloatPaths(timings, skipped, winner, errors, build_s), contenders


def _check_outputs(
    contenders: dict[str, nn.Module], example: Any, skipped: dict[str, str]
) -> dict[str, float]:
    """Drop (into ``skipped``) contenders whose output diverges from fp32 eager's."""
    with torch.no_grad():
        ref = main_output(call_model(contenders[EAGER], example))
    errors = {EAGER: 0.0}
    for name in [n for n in contenders if n != EAGER]:
        try:
            with torch.no_grad():
                out = main_output(call_model(contenders[name], example))
        except Exception as exc:  # it built but does not run: report, do not time
            skipped[name] = f"failed on the example: {_one_line(exc)}"
            del contenders[name]
            continue
        errors[name] = err = _relative_error(ref, out)
        limit = TOLERANCE.get(name, 1e-3)
        if not err <= limit:
            skipped[name] = (
                f"diverges from fp32 eager: max difference {err:.2e} of the output's "
                f"largest value (limit {limit:.0e})"
            )
            del contenders[name]
    return errors


def _batch(example: Any) -> int | None:
    try:
        return batch_size_of(example)
    except Exception:  # an input whose size cannot be read: the timing still stands
        return None
