"""What the user gets: a compressed model on the runtime that delivers it, and its name.

Shared by the demo, ``compactnn eval`` and the report: CNNs go through
``compactnn.deploy(..., backend="auto")`` (oneDNN or ONNX Runtime integer kernels),
transformers through ``compactnn.to_kernels`` (low-bit linear kernels). When neither runs
the model, it stays simulated, the runtime reads ``"simulated"`` and the reason is kept:
rows light up as more recipes deploy, without changes here.

A compressed model with nothing simulated in it (:func:`is_plain_float`: channel pruning,
a float factorization) is no simulation: it is delivered as itself, on the fastest of its
own float paths (:func:`deliver_float`), and named by that runtime. So is a probe-pruned
model (:func:`is_probe_pruned`): its MLPs really run on sliced weights, in eager PyTorch
(:func:`deliver_probe_pruned`, ``"PyTorch fp32 (probe-pruned)"``).

Example:
    >>> fast, runtime, notes = deliver("cnn", qmodel, images[:8])  # doctest: +SKIP
    >>> runtime                                                     # doctest: +SKIP
    'oneDNN int8'
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError, first_line
from compactnn.measure.float_paths import fastest_float_form, is_plain_float, is_plain_module
from compactnn.measure.timing import (  # noqa: F401 (timing_suspect: re-exported)
    DEFAULT_THREADS,
    ms_text,
    timing_owner,
    timing_suspect,
)

__all__ = [
    "SIMULATED",
    "deliver",
    "deliver_float",
    "deliver_probe_pruned",
    "float_path_name",
    "is_plain_float",
    "is_probe_pruned",
    "rounding_cause",
    "row_name",
    "runtime_name",
    "slower_note",
    "untrained_label",
]

SIMULATED = "simulated"
REASON_CHARS = 300  # a "runs simulated" reason, cut at a word boundary
PROBE_PRUNED = "PyTorch fp32 (probe-pruned)"
RUNTIME_NAMES = {"onednn": "oneDNN int8", "onnxruntime": "ONNX Runtime int8"}
FLOAT_PATH_NAMES = {
    "fp32-eager": "PyTorch fp32",
    "bf16-autocast": "PyTorch bf16 autocast",
    "torch.compile": "torch.compile fp32",
    "ort-fp32": "ONNX Runtime fp32",
    "ort-fp32-fused": "ONNX Runtime fp32, transformer fusions",
}


def deliver(kind: str, model: nn.Module, example: Any) -> tuple[nn.Module, str, list[str]]:
    """The form of ``model`` a user runs, the runtime's name, and notes on how it went.

    Args:
        kind: ``"cnn"`` (``compactnn.deploy(model, example=example, backend="auto")``:
            "oneDNN int8" or "ONNX Runtime int8", plus how many layers stay float) or
            ``"transformer"`` (``compactnn.to_kernels(model)``: "kernels bfloat16"; a model
            with per-group activations, ``a8g``, and a dict ``example``:
            ``compactnn.to_ort_nbits``, "ONNX Runtime MatMulNBits (accuracy_level 4)").
        model: the compressed (simulated) model; not modified.
        example: a sample batch, for the deploy's verification.

    Returns:
        ``(delivered, runtime, notes)``; when delivery raises or changes nothing,
        ``(model, "simulated", ["runs simulated: <reason>", ...])``. Warnings raised
        meanwhile become notes (``"delivery: ..."``). A probe-pruned transformer
        (:func:`is_probe_pruned`) is its own delivered form: :func:`deliver_probe_pruned`
        (for ``"cnn"``, ``deploy`` decides, and refuses it).
    """
    if kind == "transformer" and is_probe_pruned(model):
        return deliver_probe_pruned(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            delivered, runtime = _deliver(kind, model, example)
        except Exception as exc:  # every failure is reported in the row, never hidden
            first = clip(first_line(exc, 10_000), REASON_CHARS)
            # a CompactnnError's message is the user's words; anything else names its class
            user = isinstance(exc, CompactnnError)
            delivered, runtime = None, first if user else f"{type(exc).__name__}: {first}"
    notes = warning_notes(caught)
    if delivered is None:
        return model, SIMULATED, [f"runs simulated: {runtime}", *notes]
    return delivered, runtime, notes


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a space or comma (never inside a
    name), with ``" ..."`` where it was cut.

    Example:
        >>> clip("layers a.b.c, d.e.f, g.h.i", 20)
        'layers a.b.c ...'
    """
    if len(text) <= limit:
        return text
    head = text[: limit - 4]
    cut = max(head.rfind(" "), head.rfind(","))
    return f"{head[:cut].rstrip(' ,')} ..." if cut > 0 else f"{head}..."


def warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """``"delivery: <message>"`` notes of the warnings raised while delivering, each once,
    without ``torch.jit.TracerWarning`` (tracing noise, not news about the model)."""
    tracer = getattr(torch.jit, "TracerWarning", ())
    notes = [f"delivery: {w.message}" for w in caught if not issubclass(w.category, tracer)]
    return list(dict.fromkeys(notes))


def slower_note(float_s: float, row_s: float, *, suspect: bool = False) -> str | None:
    """The note of a delivered row slower than the fastest float path (speedup below 1),
    else None; ``float_s`` and ``row_s`` are median latencies in seconds. ``suspect``: either
    timing looked inflated (:func:`compactnn.measure.timing.suspect_reasons`), so the note
    says the verdict may be the machine's, not the model's.

    Example:
        >>> slower_note(0.002, 0.005)[:56]
        'slower than the fastest float path (5.00 ms vs 2.00 ms):'
        >>> slower_note(0.002, 0.005, suspect=True)[57:101]
        'in this run, but these timings look inflated'
        >>> slower_note(0.002, 0.001) is None
        True
    """
    if not row_s > float_s:
        return None
    head = f"slower than the fastest float path ({ms_text(row_s)} ms vs {ms_text(float_s)} ms): "
    if suspect:
        return head + (
            "in this run, but these timings look inflated (see the warnings): time it again "
            "on a quieter machine before choosing"
        )
    return head + "the float model is the faster way to run this"


UNTRAINED = "calibrated only, not trained"


def training_recipe(recipe: Any) -> bool:
    """Whether ``recipe`` (a ``Recipe``) has a training-aware step that ``compactnn train``
    trains: a ``QATConfig`` whose method has a training phase. Not one: a method that is
    post-training although it runs through the training-aware engine (its config's class
    says ``post_training = True``: Network Sketching, whose compress form is the method),
    and TernaryBERT, which distils inside compress."""
    from compactnn.engines.qat import QATConfig
    from compactnn.quant.ternarybert import TernaryBERTConfig

    return any(
        isinstance(step.config, QATConfig)
        and not isinstance(step.config, TernaryBERTConfig)
        and not getattr(type(step.config), "post_training", False)
        for step in getattr(recipe, "steps", ())
    )


def untrained_label(info: dict[str, Any]) -> str:
    """``" (calibrated only, not trained)"`` for a model (its ``compactnn.info_of`` record, or
    an artifact's header) of a training recipe that was never trained: ``extra["trained"]``
    is False, or the recipe is training-aware (:func:`training_recipe`) and neither
    ``extra["trained"]`` (written by ``compactnn.training.freeze``) nor ``extra["training"]``
    (written by ``compactnn.train`` since it exists) is there, as after ``compactnn
    compress``; else ``""``.

    Example:
        >>> from compactnn import resolve_recipe
        >>> untrained_label({"recipe": resolve_recipe("w4a4-lsq"), "extra": {}})
        ' (calibrated only, not trained)'
        >>> untrained_label({"recipe": resolve_recipe("w4a4-lsq"),
        ...                  "extra": {"training": {"epochs": 1}}})
        ''
        >>> untrained_label({"recipe": resolve_recipe("w4a8"), "extra": {}})
        ''
    """
    extra = info.get("extra") or {}
    if extra.get("trained") is False:
        return f" ({UNTRAINED})"
    if extra.get("trained") or "training" in extra:
        return ""
    return f" ({UNTRAINED})" if training_recipe(info.get("recipe")) else ""


def kernels_runtime(info: dict[str, Any]) -> str:
    """The runtime name of a ``to_kernels`` model from its ``_compactnn_kernels`` record:
    ``"kernels bfloat16"``, or with the share of its layers on kernels when some stay
    simulated (a row must not read as if the whole model ran on kernels).

    Example:
        >>> kernels_runtime({"swapped": {"a": "K"}, "simulated": {}, "dtype": "bfloat16"})
        'kernels bfloat16'
        >>> kernels_runtime({"swapped": {"a": "K"}, "simulated": {"b": "why", "c": "why"},
        ...                  "dtype": "bfloat16"})
        'kernels bfloat16 (1 of 3 layers; 2 simulated)'
    """
    on, off = len(info["swapped"]), len(info.get("simulated") or {})
    name = f"kernels {info['dtype']}"
    return f"{name} ({on} of {on + off} layers; {off} simulated)" if off else name


INTEGER_ROUNDING = (
    "integer kernels round differently from the simulation (exact int32 sums, biases on the "
    "int32 grid; docs/deploy.md)"
)


def rounding_cause(deployed: Any) -> str:
    """Why a deployed model's quality can differ from the simulated model's, from what ran:
    a ``to_kernels`` model's record (its compute dtype, the layers on each kind of kernel and
    those left simulated), else the integer kernels of ``compactnn.deploy``.

    Example:
        >>> fast = nn.Identity()
        >>> fast._compactnn_kernels = {"swapped": {"emb": "EmbeddingKernel"},
        ...                            "simulated": ["fc"], "dtype": "bfloat16"}
        >>> rounding_cause(fast)[:72]
        'the deployed model runs in bfloat16 (activations, attention, normalizati'
    """
    info = getattr(deployed, "_compactnn_kernels", None)
    if info is None:
        return INTEGER_ROUNDING
    kinds = list(info["swapped"].values())
    dtype, off = info["dtype"], len(info.get("simulated") or ())
    parts = []
    if dtype != "float32":
        bits = " to 8 significant bits" if dtype == "bfloat16" else ""
        parts.append(
            f"the deployed model runs in {dtype} (activations, attention, normalization "
            f"rounded{bits}), the simulated one in float32"
        )
    if n := kinds.count("W8A8Linear"):
        parts.append(f"{n} layer(s) on int8 kernels (exact int32 sums, per-token rounding)")
    if n := len(kinds) - kinds.count("W8A8Linear") - kinds.count("EmbeddingKernel"):
        parts.append(f"{n} weight-only layer(s) on kernels of the dequantized weights")
    if n := kinds.count("EmbeddingKernel"):
        parts.append(f"{n} embedding table(s) gathered from their codes (the simulation's formula)")
    if off:
        where = "float32" if dtype == "float32" else f"float32 on {dtype} inputs"
        parts.append(f"{off} of {off + len(kinds)} quantized layers simulated ({where})")
    return "; ".join(parts) + " (docs/transformers.md)"


def grouped_acts(model: nn.Module) -> bool:
    """Whether ``model`` has layers with per-group (``a8g``) or per-tensor (``a8d``) dynamic
    activations, which run on ONNX Runtime's ``MatMulNBits`` / ``DynamicQuantizeMatMul``
    (``to_ort_nbits``) and on no ``to_kernels`` kernel."""
    aqs = [getattr(m, "input_quantizer", None) for m in model.modules()]
    return any(getattr(aq, "runtime_range", False) for aq in aqs)


def _deliver(kind: str, model: nn.Module, example: Any) -> tuple[nn.Module | None, str]:
    if kind == "transformer" and isinstance(example, dict) and grouped_acts(model):
        fast = compactnn.to_ort_nbits(model, example)
        return fast, ort_runtime_name(fast)
    if kind == "transformer":
        fast = compactnn.to_kernels(model)
        info = fast._compactnn_kernels
        if not info["swapped"]:
            return None, "to_kernels found no layer it runs on kernels"
        return fast, kernels_runtime(info)
    # the report times every float path itself, side by side: deploy need not time them too
    deployed = compactnn.deploy(model, example=example, backend="auto", time_float=False)
    return deployed, runtime_name(deployed)


def ort_runtime_name(fast: Any) -> str:
    """``"ONNX Runtime MatMulNBits (accuracy_level 4)"``, with ``" + DynamicQuantizeMatMul"``
    when per-tensor dynamic layers run too (``fast.runtime`` lists the node types)."""
    ops = getattr(fast, "runtime", "") or ""
    if "MatMulNBits" not in ops:
        return "ONNX Runtime DynamicQuantizeMatMul"
    extra = " + DynamicQuantizeMatMul" if "DynamicQuantizeMatMul" in ops else ""
    return f"ONNX Runtime MatMulNBits{extra} (accuracy_level {fast.accuracy_level})"


def runtime_name(deployed: Any) -> str:
    """The runtime's name of a model from ``compactnn.deploy``: ``"oneDNN int8"``,
    ``"ONNX Runtime int8 (2 layers float)"``, ``"oneDNN int8 + popcount"``..."""
    runtime = RUNTIME_NAMES.get(deployed.backend, deployed.backend)
    kernels = {k["kernel"] for k in (getattr(deployed, "binary_kernels", None) or {}).values()}
    if "popcount" in kernels:  # binary blocks on the bit-packed kernel
        runtime += " + popcount"
    if "float" in kernels:  # binary blocks on float convolutions of the +-1 values
        runtime += " + float"
    if deployed.kept_float:
        runtime += f" ({len(deployed.kept_float)} layers float)"
    return runtime


def float_path_name(name: str) -> str:
    """``"ort-fp32"`` -> ``"ONNX Runtime fp32"`` (unknown names are returned as they are)."""
    return FLOAT_PATH_NAMES.get(name, name)


RACE_OCCASION = (  # a plain float row's own race: its row is timed again, with the float paths
    "the short race that picks its float path; its row is timed again beside the float model"
)


def row_name(model: nn.Module) -> str:
    """The name a compressed model's row goes by: its recipe's (``compactnn.info_of``), else
    ``"the compressed model"``."""
    recipe = compactnn.info_of(model).get("recipe")
    return getattr(recipe, "name", None) or "the compressed model"


def deliver_float(
    model: nn.Module,
    example: Any,
    *,
    quick: bool = True,
    threads: int | None = DEFAULT_THREADS,
    name: str | None = None,
) -> tuple[nn.Module, str, list[str]]:
    """A plain float model (:func:`is_plain_float`) delivered as itself: the fastest of
    its own float paths, raced as the float model's are
    (:func:`compactnn.measure.float_paths.fastest_float_form`; ``quick``: without
    ``torch.compile``), with the runtime's name and a note naming the paths raced.

    The race's timing warnings name the row (:func:`compactnn.measure.timing.timing_owner`):
    ``latency of <name>'s fp32-eager (the short race that picks its float path; ...) may be
    inflated``, never a bare path name that reads as the float model's. ``name``: the row's
    label; by default its recipe's name (:func:`row_name`).

    Returns:
        ``(fast, runtime, notes)``, like :func:`deliver`; ``runtime`` is e.g.
        ``"ONNX Runtime fp32"`` or ``"PyTorch fp32"``, never ``"simulated"``.

    Example:
        >>> fast, runtime, notes = deliver_float(pruned, images[:8])  # doctest: +SKIP
        >>> runtime                                                    # doctest: +SKIP
        'ONNX Runtime fp32'
    """
    with timing_owner(name or row_name(model), RACE_OCCASION):
        fast, paths = fastest_float_form(model, example, quick=quick, threads=threads)
    winner = float_path_name(paths.winner)
    others = [float_path_name(k) for k in paths.timings if k != paths.winner]
    raced = f", picked by a short race against {', '.join(others)}" if others else ""
    skipped = "; ".join(f"{float_path_name(k)}: {v}" for k, v in paths.skipped.items())
    more = f"; skipped {skipped}" if skipped else ""
    note = (  # the race's times are not shown: its row's latency is the one measurement
        "runs natively: a plain float model (no quantized layer, nothing to deploy), on the "
        f"fastest of its own float paths, {winner}{raced}{more}; its latency is its row's"
    )
    return fast, winner, [note]


DENSE_NO_SPEEDUP = "none (dense)"  # the speedup cell of a model with the float one's shapes
DENSE_NOISE = 1.25  # above this ratio a dense row's gap is not called noise: the load's


def same_dense_compute(float_model: nn.Module, model: nn.Module) -> bool:
    """Whether ``model`` is a plain float model (:func:`is_plain_float`) with every parameter
    shaped as ``float_model``'s: unstructured or N:M pruning (its zeros are multiplied like
    any weight), or float weights merely changed. It runs the float model's dense compute,
    so a latency gap between the two is noise, never a speedup."""
    if not is_plain_float(model):
        return False
    shapes = {n: tuple(p.shape) for n, p in float_model.named_parameters()}
    return shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}


def dense_note(float_s: float, row_s: float) -> str:
    """The note of a row that runs the float model's dense compute (:func:`same_dense_compute`).

    Example:
        >>> dense_note(0.002, 0.00185)[:62]
        'no speedup claimed: the compressed model keeps every weight sh'
    """
    gap = max(float_s, row_s) / min(float_s, row_s) if min(float_s, row_s) > 0 else 1.0
    said = (
        f"{ms_text(row_s)} ms vs {ms_text(float_s)} ms is timing noise"
        if gap <= DENSE_NOISE
        else f"the {gap:.1f}x gap between {ms_text(row_s)} ms and {ms_text(float_s)} ms is the "
        "machine's (its load moved one of the two timings), not the model's: time both again "
        "on a quieter machine"
    )
    return (
        "no speedup claimed: the compressed model keeps every weight shape of the float one "
        "(unstructured or N:M zeros are multiplied like any weight, see docs/pruning.md), so "
        f"it runs the same dense compute; {said} (for a real speedup: channel pruning, ch<P>, "
        "or quantization)"
    )


def is_probe_pruned(model: nn.Module) -> bool:
    """True when ``model`` holds Probe Pruning's MLPs (``prune.probe.ProbeMLP``) and simulates
    nothing else: every other module is PyTorch's, the user's or a reference model's, and
    no weight is parametrized (as :func:`is_plain_float` asks of every module)."""
    from compactnn.prune.probe import ProbeMLP

    modules = list(model.modules())
    found = any(isinstance(m, ProbeMLP) for m in modules)
    return found and all(isinstance(m, ProbeMLP) or is_plain_module(m) for m in modules)


def deliver_probe_pruned(model: nn.Module) -> tuple[nn.Module, str, list[str]]:
    """A probe-pruned model (:func:`is_probe_pruned`) delivered as itself: its MLPs pick
    their channels per input and multiply sliced weights, in eager PyTorch fp32 (``deploy``
    does not take it; ``to_kernels`` would keep its MLPs in bfloat16), so its latency is real,
    and its speedup may be
    below 1x (the probe and the slicing cost time).

    Returns:
        ``(model, "PyTorch fp32 (probe-pruned)", [note])``, like :func:`deliver`.
    """
    from compactnn.prune.probe import ProbeMLP

    probes = [m for m in model.modules() if isinstance(m, ProbeMLP)]
    config = probes[0].config
    choice = (
        "the same for every batch, from the calibration statistics"
        if config.mode == "static"
        else f"chosen per {config.mode} by a probe"
    )
    note = (
        f"runs as itself: probe-pruned ({len(probes)} MLPs skip {config.ratio:.0%} of their "
        f"hidden channels, {choice}; weights sliced at run time) in eager PyTorch fp32 "
        "(deploy does not take it; to_kernels would keep the probe MLPs in bfloat16)"
    )
    return model, PROBE_PRUNED, [note]
