"""Latency on the deploy runtime: a per-layer lookup table and the whole-model check.

The table is built once per search: each candidate format is compressed uniformly, deployed
(:func:`compactnn.deploy`, oneDNN int8) and timed side by side with the others (rotating
blocks, :func:`compactnn.measure.timing.time_blocks`); layer ``l``'s entry at format ``f``
is the time of its own kernel in that deployment (forward hooks, :func:`layer_times`) plus an
equal share of the time spent outside the layers (quantize, pooling, adds), so a uniform
choice sums to the measured ``T_f``. Where the kernels cannot be told apart the table falls
back to ``t[l, f] = T_f * MACs_l / sum MACs``. The per-layer sum is only a proxy (fusion,
requantisation between formats, fixed overheads), so the chosen configuration is deployed and
timed again beside the uniform reference, and the proxy's error is reported.

A ``ch<P>+`` (channel-pruned) format shrinks a layer and the inputs of the layer after it; the
saving measured in the next layer is credited to the pruned layer (:func:`credited`), which
keeps the table additive over per-layer choices.
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn.api import compress
from compactnn.core.calib import batch_size_of, call_model, detect_call_mode
from compactnn.deployment.api import deploy
from compactnn.errors import CompactnnError
from compactnn.measure.timing import model_call, time_blocks
from compactnn.prune.stats import layer_macs
from compactnn.recipe import Recipe

RUNS = 30


TOLERANCE = 8.0  # steps of the output scale; random-weight networks amplify one-code gaps


def compressed(model: nn.Module, recipe: Recipe, calib: list) -> nn.Module:
    """``compactnn.compress`` without progress bars or warnings (skipped layers are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(model, recipe, calib_data=calib, progress=False)


def deployed(model: nn.Module, recipe: Recipe, calib: list, example: Any) -> nn.Module:
    """``model`` compressed with ``recipe`` and deployed on oneDNN int8 kernels (verified)."""
    return deploy_compressed(compressed(model, recipe, calib), example)


def deploy_compressed(q: nn.Module, example: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return deploy(q, "onednn", example=example, tolerance=TOLERANCE)


def macs_of(model: nn.Module, names: list[str], example: Any) -> list[int]:
    """MACs per sample of the layers ``names`` of ``model`` on ``example``."""
    mode = detect_call_mode(model, example)
    layers = {n: model.get_submodule(n) for n in names}
    macs = layer_macs(model, layers, lambda m: call_model(m, example, mode))
    return [macs[n] for n in names]


def credited(
    before: list[float], after: list[float], shrank_out: list[bool], shrank_in: list[bool]
) -> list[float]:
    """Per-layer costs (MACs or ms) after pruning, each saving credited to the pruned layer:
    a layer whose inputs shrank but whose outputs did not keeps its ``before`` cost and hands
    ``after - before`` to the nearest earlier layer whose outputs shrank.

    Example:
        >>> credited([10, 20, 30], [5, 10, 30], [True, False, False], [False, True, False])
        [-5.0, 20.0, 30.0]
    """
    out = [float(a) for a in after]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if shrank_in[i] and not shrank_out[i]:
            j = next((k for k in range(i - 1, -1, -1) if shrank_out[k]), None)
            if j is not None:
                out[i] = float(b)
                out[j] += a - b
    return out


def layer_times(
    models: dict[str, nn.Module], names: list[str], example: Any, runs: int = RUNS
) -> dict[str, list[float]] | None:
    """Median milliseconds per forward of each layer's kernel inside each deployed model
    (``int8_<k>_<layer>`` modules of the oneDNN program, timed by forward hooks, calls
    rotating over the models), then the median of the whole call; None when a layer has no
    kernel module of its own."""
    keys = {n.replace(".", "_"): i for i, n in enumerate(names)}
    mods: dict[str, dict[int, nn.Module]] = {}
    for f, m in models.items():
        mods[f] = {}
        for path, mod in m.named_modules():
            hit = re.fullmatch(r"int8_\d+_(.+)", path.rsplit(".", 1)[-1])
            if hit and hit[1] in keys:
                mods[f][keys[hit[1]]] = mod
        if len(mods[f]) != len(names):
            return None
    warmup = 3
    acc = {f: np.zeros((warmup + runs, len(names) + 1)) for f in models}  # last: whole call
    state = {"run": 0, "t": 0.0}

    def pre(*_: Any) -> None:
        state["t"] = time.perf_counter()

    def post(f: str, i: int):
        def hook(*_: Any) -> None:
            acc[f][state["run"], i] += time.perf_counter() - state["t"]

        return hook

    handles = [
        h
        for f in mods
        for i, mod in mods[f].items()
        for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(f, i)))
    ]
    # the fx program itself (the deployed model's straight-line runner skips module hooks)
    calls = {f: model_call(getattr(m, "program", m), example) for f, m in models.items()}
    order = list(calls)
    try:
        with torch.no_grad():
            for r in range(warmup + runs):
                state["run"] = r
                for f in order[r % len(order) :] + order[: r % len(order)]:
                    t0 = time.perf_counter()
                    calls[f]()
                    acc[f][r, -1] = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {f: list(np.median(a[warmup:], axis=0) * 1e3) for f, a in acc.items()}


def time_models(
    models: dict[str, nn.Module], example: Any, runs: int = RUNS, cpu: dict | None = None
) -> dict[str, float]:
    """Median milliseconds per call of each model, timed side by side in rotating blocks;
    ``cpu`` (a dict), when given, receives each model's process CPU milliseconds per call."""
    calls = {k: model_call(m, example) for k, m in models.items()}
    timings = time_blocks(calls, runs=runs, batch=batch_size_of(example))
    if cpu is not None:
        cpu.update({k: float(t.cpu_s or float("nan")) * 1e3 for k, t in timings.items()})
    return {k: float(t.median_s) * 1e3 for k, t in timings.items()}


def latency_table(
    per_format_ms: dict[str, float],
    formats: list[str],
    macs: list[int],
    credited: dict[str, list[float]] | None = None,
) -> np.ndarray:
    """``(L, F)`` per-layer latency proxy: each format's whole-model time split by MAC share.

    ``credited[f]`` (pruned formats, :func:`credited_macs`) replaces ``macs`` for format ``f``:
    ``t[l, f] = T_f * credited_l / sum(credited)``.

    Example:
        >>> latency_table({"a": 2.0, "b": 4.0}, ["a", "b"], [1, 3]).tolist()
        [[0.5, 1.0], [1.5, 3.0]]
    """
    if float(np.sum(macs)) <= 0:
        raise CompactnnError("latency table: no layer ran on the example (zero MACs).")
    cols = []
    for f in formats:
        m = np.asarray((credited or {}).get(f, macs), dtype=np.float64)
        cols.append(per_format_ms[f] * m / m.sum())
    return np.stack(cols, axis=1)


def shrinking(model: nn.Module, names: list[str], q: nn.Module, dim: int = 0) -> list[bool]:
    """Which layers of ``q`` (a compressed ``model``) have fewer output (``dim=0``) or input
    (``dim=1``) channels."""
    return [
        q.get_submodule(n).weight.shape[dim] < model.get_submodule(n).weight.shape[dim]
        for n in names
    ]


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
    names: list[str],
    calib: list,
    example: Any,
    macs: list[int],
    reference: str | None = None,
) -> tuple[np.ndarray, dict[str, float], dict[str, nn.Module]]:
    """The per-layer table from uniform deployments of every format.

    ``recipe_of(choice)`` turns an ``(L,)`` format-index array into a recipe. Each layer's
    entry is its kernel's measured time in that format's uniform deployment
    (:func:`layer_times`, pruning savings credited to the pruned layer against
    ``reference``'s times) plus an equal share of the time outside the layers; where the
    kernels cannot be told apart, the whole-model time split by MAC share. Returns the table,
    each format's whole-model milliseconds and the deployed uniform models.
    """
    models, flags, macs_credit = {}, {}, {}
    for j, f in enumerate(formats):
        q = compressed(model, recipe_of(np.full(len(names), j)), calib)
        flags[f] = (shrinking(model, names, q), shrinking(model, names, q, dim=1))
        if any(flags[f][0]):
            macs_credit[f] = credited(macs, macs_of(q, names, example), *flags[f])
        models[f] = deploy_compressed(q, example)
    times = layer_times(models, names, example)
    if times is None:
        per_format = time_models(models, example)
        return latency_table(per_format, formats, macs, macs_credit), per_format, models
    # one timing session for the layers and the whole calls: a consistent table under load
    per_format = {f: float(t[-1]) for f, t in times.items()}
    ref = times[reference or formats[-1]][:-1]
    cols = []
    for f in formats:
        t = times[f][:-1]
        own = credited(ref, t, *flags[f]) if any(flags[f][0]) else t
        cols.append(np.array(own) + (per_format[f] - sum(t)) / len(names))
    return np.stack(cols, axis=1), per_format, models


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
    cpu: dict[str, float] = {}
    ms = time_models({"searched": searched, reference[0]: reference[1]}, example, cpu=cpu)
    return {
        "reference": reference[0],
        "reference_ms": ms[reference[0]],
        "measured_ms": ms["searched"],
        "proxy_ms": proxy_ms,
        "proxy_error": (proxy_ms - ms["searched"]) / ms["searched"],
        "measured_ratio": ms["searched"] / ms[reference[0]],
        "reference_cpu_ms": cpu[reference[0]],
        "measured_cpu_ms": cpu["searched"],
        "cpu_ratio": cpu["searched"] / cpu[reference[0]],
    }
