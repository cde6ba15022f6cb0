"""The float side of ``deploy(backend="auto")``: the float twin of a simulated model, its
fp32 contenders (eager, ONNX Runtime), side-by-side timing, and the advice given when float
is faster than the int8 model."""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Any

from torch import nn

from compactnn._optional import require
from compactnn.core.calib import call_model
from compactnn.core.float_twin import float_model
from compactnn.errors import CompactnnError, first_line, user_stacklevel
from compactnn.measure import timing
from compactnn.measure.float_paths import ort_float
from compactnn.measure.timing import model_call, ms_text, time_blocks

FLOAT_CONTENDERS = ("fp32-onnxruntime", "fp32-eager")  # timed beside the int8 backends
FLOAT_MARGIN = 1.1  # float must win by more than 10% before deploy says so


def float_contenders(sim: nn.Module, example: Any) -> dict[str, Any]:
    """fp32 eager, and fp32 ONNX Runtime when it is installed, of the float twin of ``sim``."""
    fmodel = float_model(sim)
    out: dict[str, Any] = {}
    try:
        require("onnxruntime", "onnx")
        require("onnx", "onnx")  # the exporter writes through it
    except CompactnnError:  # not installed: nothing to compare with
        return {"fp32-eager": fmodel}
    try:
        ort = ort_float(fmodel, example)  # measure.float_paths
        call_model(ort, example)  # some graphs build but fail at run time (SAME_UPPER + dilation)
        out["fp32-onnxruntime"] = ort
    except Exception as e:  # an optional peer: a failure costs the comparison, not the deploy
        # the first line only: the exporter's errors go on with a dump of the whole graph
        warnings.warn(
            f"deploy: ONNX Runtime fp32 not timed ({first_line(e)})", stacklevel=user_stacklevel()
        )
    out["fp32-eager"] = fmodel
    return out


def time_contenders(contenders: dict[str, Any], example: Any, runs: int = 6) -> dict[str, float]:
    """Seconds per call of each contender on ``example``, its fastest timed call: the
    library's rotating-block protocol (:func:`compactnn.measure.timing.time_blocks`), kept
    short for a deploy: one warm-up and ``runs`` timed calls per contender in 3 rounds (more
    for a fast model: blocks of about 20 ms), current threads; :func:`settled` re-times a
    close race.

    The fastest call, not the median, decides: with so few calls, a busy machine's
    interference (which only ever adds time) moved medians enough to pick ONNX Runtime at
    4.3 ms over oneDNN's 0.49 ms for mnist-cnn in a demo run at load 3.5."""
    calls = {k: model_call(m, example) for k, m in contenders.items()}
    with timing.quiet_timing():  # a noisy race still ranks them by their fastest calls; the
        # table timed later warns each distinct text once (else fp32-eager's `*` there
        # goes unexplained)
        timings = time_blocks(calls, warmup=1, runs=runs, threads=None, pause_s=0.01, block_s=0.02)
    return {k: t.min_s for k, t in timings.items()}


CLOSE = 1.3  # two contenders within this factor of each other are timed again before deploy
# chooses between them or advises a float path (a 7-call race flipped between identical runs)


def settled(
    selection: dict[str, float], contenders: dict[str, Any], example: Any, ints: Collection[str]
) -> dict[str, float]:
    """``selection`` with the calls that decide re-timed: when the fastest float path is faster
    than the fastest int8 candidate or slower by less than :data:`CLOSE` (it may be advised),
    or the second int8 candidate is within :data:`CLOSE` of the first, every int8 candidate
    and the fastest float path run 12 calls more each and keep the fastest call of both races
    (interference only ever adds time, so more calls can only bring each one's time down
    towards its own cost). A clear race is not re-timed: no extra cost.

    Example:
        >>> settled({"onednn": 1e-3, "fp32-eager": 5e-3}, {}, None, ["onednn"])
        {'onednn': 0.001, 'fp32-eager': 0.005}
    """
    ranked = sorted((k for k in selection if k in ints), key=selection.get)
    floats = sorted((k for k in selection if k in FLOAT_CONTENDERS), key=selection.get)
    if not ranked:
        return dict(selection)
    best = selection[ranked[0]]
    close = {k for k in (*ranked[1:2], *floats[:1]) if selection[k] <= best * CLOSE}
    if not close:
        return dict(selection)
    # every int8 candidate runs again, not only the close ones: a loaded spell inflated
    # oneDNN's fastest of 7 calls to 53 ms (0.8 ms alone), and auto chose ONNX Runtime
    again = {k: contenders[k] for k in (*ranked, *floats[:1])}
    second = time_contenders(again, example, runs=12)
    return {k: min(v, second.get(k, v)) for k, v in selection.items()}


def fewest_float(kept: dict[str, dict[str, str]]) -> list[str]:
    """The candidates (backend -> its ``kept_float``) that keep the fewest quantized layers
    in float: ``deploy(backend="auto")`` chooses among them only, so a backend that keeps
    layers float wins only when no candidate runs them on integer kernels.

    Example:
        >>> fewest_float({"onednn": {}, "onnxruntime": {"fc": "codebook weights"}})
        ['onednn']
    """
    least = min((len(v) for v in kept.values()), default=0)
    return [k for k, v in kept.items() if len(v) == least]


def passed_over(chosen: str, kept: dict[str, dict[str, str]], listing: Any) -> str | None:
    """The note when a candidate was left out for keeping more layers float than ``chosen``
    (``listing`` formats a kept-float dict), else None."""
    others = {k: v for k, v in kept.items() if len(v) > len(kept[chosen])}
    if not others:
        return None
    runs = (
        "runs every quantized layer on integer kernels"
        if not kept[chosen]
        else f"keeps fewer in float ({len(kept[chosen])})"
    )
    return (
        f"deploy: chose {chosen}, which {runs}, over "
        + "; ".join(f"{k}, which keeps in float {listing(v)}" for k, v in others.items())
        + " (backend='auto' prefers integer kernels to speed)."
    )


_FLOAT_ADVICE = {
    "fp32-onnxruntime": (
        "ONNX Runtime fp32",
        "export the float model with torch.onnx.export and run it with onnxruntime",
    ),
    "fp32-eager": ("PyTorch fp32 eager", "run the float model in PyTorch"),
}


def float_advice(selection: dict[str, float], chosen: str) -> str | None:
    """The warning when the fastest float path beats the chosen int8 model, else None."""
    floats = {k: v for k, v in selection.items() if k in FLOAT_CONTENDERS}
    if not floats or chosen not in selection:
        return None
    best = min(floats, key=floats.get)
    t_int, t_float = selection[chosen], floats[best]
    if t_float * FLOAT_MARGIN >= t_int:
        return None
    label, how = _FLOAT_ADVICE[best]
    return (
        f"deploy: {label} runs this model {t_int / t_float:.1f}x faster than int8 on "
        f"{chosen} at this input shape ({ms_text(t_float)} ms against {ms_text(t_int)} ms "
        f"fastest timed call on example=): for speed, {how}. int8 kernels pay a fixed "
        "cost per layer (quantize, launch, requantize) that small inputs and depthwise or "
        "1x1 convolutions with few channels do not earn back; a larger batch or input may."
    )
