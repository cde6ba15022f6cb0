"""Benchmark section ``ptq``: post-training quantization methods side by side.

For each reference CNN and bit-width (W8A8, W4A8, W4A4, W3A3, W2A4): float, round-to-nearest
(min-max and MSE ranges), bias correction, CLE before MSE-range RTN, AdaRound, BRECQ, QDrop
and BitSplit, all in one run on the same calibration batches. Stochastic methods run with
three seeds at the low bit-widths; the table gives the mean and the spread (max - min).

Regenerate with ``python -m compactnn.bench --only ptq`` (``--quick``: mnist-cnn at W4A4 only,
one seed per method).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from typing import Any

import torch

from compactnn.measure.timing import DEFAULT_THREADS, set_threads
from compactnn.recipe import Recipe, Step, parse_short_name

COMMAND = "python -m compactnn.bench --only ptq"
MODELS = ("mnist-cnn", "digits-resnet")
BITS = ("w8a8", "w4a8", "w4a4", "w3a3", "w2a4")
METHODS = ("rtn", "mse", "biascorr", "cle+mse", "bitsplit", "adaround", "brecq", "qdrop")
STOCHASTIC = ("adaround", "brecq", "qdrop")
SEEDED_BITS = ("w4a4", "w3a3", "w2a4")  # three seeds where the methods matter
SEEDS = (0, 1, 2)
# --quick: one model, one bit-width where the methods differ, one seed (every method still runs)
QUICK_MODELS = ("mnist-cnn",)
QUICK_BITS = ("w4a4",)


def recipe_for(bits: str, method: str) -> Recipe:
    """The recipe of one table cell; ``cle+x`` puts a CLE step before ``x``."""
    from compactnn.quant.cle import CLEConfig

    if method.startswith("cle+"):
        steps = parse_short_name(f"{bits}-{method[4:]}").steps
        return Recipe(f"{bits}-{method}", (Step("cle", CLEConfig()), *steps))
    return parse_short_name(bits if method == "rtn" else f"{bits}-{method}")


def compress_once(ref: Any, recipe: Recipe, seed: int) -> tuple[float, float, float]:
    """Top-1 %, wall seconds and CPU seconds of one compression."""
    import compactnn

    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration-size warnings; recorded in notes
        qmodel = compactnn.compress(ref.model, recipe, ref.calib, seed=seed, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return float(ref.evaluate(qmodel)), wall, cpu


def run_cell(ref: Any, bits: str, method: str, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Mean, spread and worst compression time of one (bits, method) over ``seeds``."""
    tops, walls, cpus = [], [], []
    for seed in seeds:
        try:
            top1, wall, cpu = compress_once(ref, recipe_for(bits, method), seed)
        except Exception as exc:  # a failing method is a finding, not a crash
            return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        tops.append(top1)
        walls.append(wall)
        cpus.append(cpu)
        # progress on stderr: the full run takes a while on a shared machine
        print(
            f"ptq {ref.name} {bits} {method} seed={seed}: {top1:.2f}% {wall:.1f}s wall "
            f"{cpu:.1f}s cpu",
            file=sys.stderr,
            flush=True,
        )
    return {
        "top1": statistics.mean(tops),
        "spread": max(tops) - min(tops) if len(tops) > 1 else None,
        "wall": max(walls),
        "cpu": max(cpus),
        "n": len(tops),
    }


def _cell(res: dict[str, Any], float_top1: float) -> str:
    if "error" in res:
        return f"failed: {res['error']}"
    s = f"{res['top1']:.2f} ({res['top1'] - float_top1:+.2f})"
    if res["spread"] is not None:
        s += f" ±{res['spread']:.2f}/{res['n']}"
    return s


def model_section(name: str, quick: bool) -> str:
    """The Markdown tables of one reference model."""
    from compactnn.models import load_reference

    ref = load_reference(name, progress=False)
    float_top1 = float(ref.evaluate(ref.model))
    bits = QUICK_BITS if quick else BITS
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for b in bits:
        for m in METHODS:
            many = m in STOCHASTIC and b in SEEDED_BITS and not quick
            results[b, m] = run_cell(ref, b, m, SEEDS if many else (0,))
    lines = [
        f"### {name}: top-1 % (change vs float {float_top1:.2f})",
        "",
        "| method | " + " | ".join(b.upper() for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for m in METHODS:
        cells = [_cell(results[b, m], float_top1) for b in bits]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"### {name}: compression time, seconds: wall / CPU (slowest seed)", ""]
    lines += ["| method | " + " | ".join(b.upper() for b in bits) + " |"]
    lines += ["|---|" + "---|" * len(bits)]
    for m in METHODS:
        cells = ["-" if "error" in results[b, m] else _time(results[b, m]) for b in bits]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    best = _best_rows(results, bits, float_top1)
    return "\n".join([*lines, "", *best, ""])


def _time(res: dict[str, Any]) -> str:
    return f"{res['wall']:.1f} / {res['cpu']:.1f}"


def _best_rows(results: dict, bits: tuple[str, ...], float_top1: float) -> list[str]:
    """The best method per bit-width and its gap to float (the issue's targets)."""
    out = ["Best method per bit-width (gap to float):", ""]
    for b in bits:
        ok = {m: r for (bb, m), r in results.items() if bb == b and "error" not in r}
        if not ok:
            continue
        m = max(ok, key=lambda k: ok[k]["top1"])
        out.append(f"- {b.upper()}: {m}, {ok[m]['top1'] - float_top1:+.2f} points")
    return out


def run(quick: bool = False) -> str:
    """Measure every method at every bit-width on both reference CNNs; return Markdown."""
    threads = set_threads(DEFAULT_THREADS)
    header = [
        "## Post-training quantization: RTN vs reconstruction methods",
        "",
        f"`{COMMAND}{' --quick' if quick else ''}`; torch threads: {threads}; "
        f"torch {torch.__version__}.",
        "",
        "Cells: held-out top-1 % (change vs float). `±s/n`: spread (max - min) over n seeds. "
        "`mse`: RTN with MSE-searched ranges; `cle+mse`: cross-layer equalization, then "
        "`mse`; `biascorr`: RTN plus empirical bias correction. First and last layers keep 8 "
        "bits (the field's convention). Calibration: each reference's own batches "
        "(training split). Times: wall and CPU seconds of `compactnn.compress` (the machine is "
        "shared, so wall time overstates; CPU time over the thread count bounds the wall time "
        "on an idle machine).",
        "",
    ]
    sections = [model_section(name, quick) for name in (QUICK_MODELS if quick else MODELS)]
    return "\n".join(header + sections)
