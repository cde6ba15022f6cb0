"""Latency on the deploy runtime: a per-layer lookup table and the whole-model check.

The table is built once per search from measured whole-model latencies: each candidate format
is compressed uniformly, deployed (:func:`compactnn.deploy`, oneDNN int8) and timed side by
side with the others (rotating blocks, :func:`compactnn.measure.timing.time_blocks`); layer
``l``'s entry at format ``f`` is format ``f``'s measured time times the layer's share of the
MACs, ``t[l, f] = T_f * MACs_l / sum MACs``. The per-layer sum is only a proxy (fusion,
requantisation between formats, fixed overheads), so the chosen configuration is deployed and
timed again beside the uniform reference, and the proxy's error is reported.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from torch import nn

from compactnn.api import compress
from compactnn.core.calib import batch_size_of
from compactnn.deployment.api import deploy
from compactnn.errors import CompactnnError
from compactnn.measure.timing import model_call, time_blocks
from compactnn.recipe import Recipe

RUNS = 30


def deployed(model: nn.Module, recipe: Recipe, calib: list, example: Any) -> nn.Module:
    """``model`` compressed with ``recipe`` and deployed on oneDNN int8 kernels (verified)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compress(model, recipe, calib_data=calib, progress=False)
        return deploy(q, "onednn", example=example)


def time_models(models: dict[str, nn.Module], example: Any, runs: int = RUNS) -> dict[str, float]:
    """Median milliseconds per call of each model, timed side by side in rotating blocks."""
    calls = {k: model_call(m, example) for k, m in models.items()}
    timings = time_blocks(calls, runs=runs, batch=batch_size_of(example))
    return {k: float(t.median_s) * 1e3 for k, t in timings.items()}


def latency_table(
    per_format_ms: dict[str, float], formats: list[str], macs: list[int]
) -> np.ndarray:
    """``(L, F)`` per-layer latency proxy: each format's whole-model time split by MAC share.

    Example:
        >>> latency_table({"a": 2.0, "b": 4.0}, ["a", "b"], [1, 3]).tolist()
        [[0.5, 1.0], [1.5, 3.0]]
    """
    share = np.asarray(macs, dtype=np.float64)
    if share.sum() <= 0:
        raise CompactnnError("latency table: no layer ran on the example (zero MACs).")
    share = share / share.sum()
    return share[:, None] * np.array([per_format_ms[f] for f in formats])[None, :]


def check_deployable(formats: list[Any]) -> None:
    """Latency budgets need formats that deploy (weights and activations of <= 8 bits)."""
    bad = [f.name for f in formats if f.act is None or f.weight.bits > 8]
    if bad:
        raise CompactnnError(
            f"a latency budget needs formats that run on the int8 runtime (w<=8 a<=8, e.g. "
            f"w4a8); these are weight-only: {', '.join(bad)}."
        )


def measure_table(
    model: nn.Module,
    formats: list[str],
    recipe_of: Any,
    n_layers: int,
    calib: list,
    example: Any,
    macs: list[int],
) -> tuple[np.ndarray, dict[str, float], dict[str, nn.Module]]:
    """The per-layer table from uniform deployments of every format.

    ``recipe_of(choice)`` turns an ``(L,)`` format-index array into a recipe. Returns the
    table, each format's whole-model milliseconds and the deployed uniform models.
    """
    models = {
        f: deployed(model, recipe_of(np.full(n_layers, j)), calib, example)
        for j, f in enumerate(formats)
    }
    per_format = time_models(models, example)
    return latency_table(per_format, formats, macs), per_format, models


def whole_model_check(
    model: nn.Module,
    recipe: Recipe,
    calib: list,
    example: Any,
    proxy_ms: float,
    reference: tuple[str, nn.Module],
) -> dict[str, float | str]:
    """Deploy ``recipe``, time it beside the reference deployment; the proxy's error."""
    searched = deployed(model, recipe, calib, example)
    ms = time_models({"searched": searched, reference[0]: reference[1]}, example)
    return {
        "reference": reference[0],
        "reference_ms": ms[reference[0]],
        "measured_ms": ms["searched"],
        "proxy_ms": proxy_ms,
        "proxy_error": (proxy_ms - ms["searched"]) / ms["searched"],
        "measured_ratio": ms["searched"] / ms[reference[0]],
    }
