"""What the user gets: a compressed model on the runtime that delivers it, and its name.

Shared by the demo, ``compactnn eval`` and the report: CNNs go through
``compactnn.deploy(..., backend="auto")`` (oneDNN or ONNX Runtime integer kernels),
transformers through ``compactnn.to_kernels`` (low-bit linear kernels). When neither runs
the model, it stays simulated, the runtime reads ``"simulated"`` and the reason is kept:
rows light up as more recipes deploy, without changes here.

A compressed model with nothing simulated in it (:func:`is_plain_float`: channel pruning,
a float factorization) is no simulation: it is delivered as itself, on the fastest of its
own float paths (:func:`deliver_float`), and named by that runtime.

Example:
    >>> fast, runtime, notes = deliver("cnn", qmodel, images[:8])  # doctest: +SKIP
    >>> runtime                                                     # doctest: +SKIP
    'oneDNN int8'
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

import compactnn
from compactnn.errors import first_line
from compactnn.measure.float_paths import fastest_float_form, is_plain_float
from compactnn.measure.timing import DEFAULT_THREADS

__all__ = [
    "SIMULATED",
    "deliver",
    "deliver_float",
    "float_path_name",
    "is_plain_float",
    "runtime_name",
]

SIMULATED = "simulated"
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
            ``"transformer"`` (``compactnn.to_kernels(model)``: "kernels bfloat16").
        model: the compressed (simulated) model; not modified.
        example: a sample batch, for the deploy's verification.

    Returns:
        ``(delivered, runtime, notes)``; when delivery raises or changes nothing,
        ``(model, "simulated", ["runs simulated: <reason>", ...])``. Warnings raised
        meanwhile become notes (``"delivery: ..."``).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            delivered, runtime = _deliver(kind, model, example)
        except Exception as exc:  # every failure is reported in the row, never hidden
            first = first_line(exc, 300)
            delivered, runtime = None, f"{type(exc).__name__}: {first}"
    notes = [f"delivery: {w.message}" for w in caught]
    if delivered is None:
        return model, SIMULATED, [f"runs simulated: {runtime}", *notes]
    return delivered, runtime, notes


def _deliver(kind: str, model: nn.Module, example: Any) -> tuple[nn.Module | None, str]:
    if kind == "transformer":
        fast = compactnn.to_kernels(model)
        info = fast._compactnn_kernels
        if not info["swapped"]:
            return None, "to_kernels found no layer it runs on kernels"
        return fast, f"kernels {info['dtype']}"
    # the report times every float path itself, side by side: deploy need not time them too
    deployed = compactnn.deploy(model, example=example, backend="auto", time_float=False)
    return deployed, runtime_name(deployed)


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


def deliver_float(
    model: nn.Module,
    example: Any,
    *,
    quick: bool = True,
    threads: int | None = DEFAULT_THREADS,
) -> tuple[nn.Module, str, list[str]]:
    """A plain float model (:func:`is_plain_float`) delivered as itself: the fastest of
    its own float paths, raced as the float model's are
    (:func:`compactnn.measure.float_paths.fastest_float_form`; ``quick``: without
    ``torch.compile``), with the runtime's name and a note listing the paths' times.

    Returns:
        ``(fast, runtime, notes)``, like :func:`deliver`; ``runtime`` is e.g.
        ``"ONNX Runtime fp32"`` or ``"PyTorch fp32"``, never ``"simulated"``.

    Example:
        >>> fast, runtime, notes = deliver_float(pruned, images[:8])  # doctest: +SKIP
        >>> runtime                                                    # doctest: +SKIP
        'ONNX Runtime fp32'
    """
    fast, paths = fastest_float_form(model, example, quick=quick, threads=threads)
    times = ", ".join(
        f"{float_path_name(k)} {t.median_s * 1e3:.2f} ms" for k, t in paths.timings.items()
    )
    skipped = "; ".join(f"{float_path_name(k)}: {v}" for k, v in paths.skipped.items())
    more = f"; skipped {skipped}" if skipped else ""
    note = (
        "runs natively: a plain float model (no quantized layer, nothing to deploy), on the "
        f"fastest of its own float paths ({times}{more})"
    )
    return fast, float_path_name(paths.winner), [note]
