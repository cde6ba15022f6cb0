"""What the user gets: a compressed model on the runtime that delivers it, and its name.

Shared by the demo, ``compactnn eval`` and the report: CNNs go through
``compactnn.deploy(..., backend="auto")`` (oneDNN or ONNX Runtime integer kernels),
transformers through ``compactnn.to_kernels`` (low-bit linear kernels). When neither runs
the model, it stays simulated, the runtime reads ``"simulated"`` and the reason is kept:
rows light up as more recipes deploy, without changes here.

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
    runtime = RUNTIME_NAMES.get(deployed.backend, deployed.backend)
    kernels = {k["kernel"] for k in (getattr(deployed, "binary_kernels", None) or {}).values()}
    if "popcount" in kernels:  # binary blocks on the bit-packed kernel
        runtime += " + popcount"
    if "float" in kernels:  # binary blocks on float convolutions of the +-1 values
        runtime += " + float"
    if deployed.kept_float:
        runtime += f" ({len(deployed.kept_float)} layers float)"
    return deployed, runtime


def float_path_name(name: str) -> str:
    """``"ort-fp32"`` -> ``"ONNX Runtime fp32"`` (unknown names are returned as they are)."""
    return FLOAT_PATH_NAMES.get(name, name)
