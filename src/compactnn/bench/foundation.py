"""Benchmark section ``foundation``: plain RTN recipes on the reference models, each on
the form a user runs (``report.delivery.deliver``: ``compactnn.deploy`` for CNNs,
``compactnn.to_kernels`` for transformers), beside every float path and peer tools, all
measured in one run.

Timing follows BENCHMARKING.md: every contender in its own block of calls after a short
pause, rotating rounds, medians; wall and CPU time; the machine line names the CPU and AMX.
A row whose delivery failed runs simulated and says so; its speed is not compared.

Regenerate with ``python -m compactnn.bench --only foundation``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from compactnn.bench.peers import PeerResult, ort_models, quanto_models, torchao_models
from compactnn.core.calib import batch_size_of
from compactnn.measure.fidelity import first_rows, fmt_quality
from compactnn.measure.float_paths import FloatPaths, fastest_float_path
from compactnn.measure.size import float_artifact_bytes
from compactnn.measure.timing import DEFAULT_THREADS, TimingWarning, model_call, set_threads

COMMAND = "python -m compactnn.bench --only foundation"
QUICK_BATCH = 16  # --quick times a smaller throughput batch (a smoke test, not the protocol)
QUICK_NOTE = (
    f" (quick mode: a smoke test on a shared machine; throughput batch {QUICK_BATCH}, "
    "3 rounds, no torch.compile; rerun without --quick for the protocol's numbers)"
)
RECIPES = {
    "mnist-cnn": ["float", "w8a8", "w4a8", "w4a4", "w2a4"],
    "minilm": ["float", "w8", "w4-g32", "w3-g32"],
}


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def int8_peers(ref: Any) -> dict[str, PeerResult | str]:
    """The peer tools for this model: ONNX Runtime static and dynamic int8 for a CNN;
    torchao, optimum-quanto and ONNX Runtime dynamic int8 for a transformer (static int8
    of activations too is not how transformers are quantized with ONNX Runtime)."""
    try:
        ort = ort_models(ref.model, ref.example, ref.calib, DEFAULT_THREADS)
    except Exception as exc:  # the export itself failed: every ORT contender fails with it
        ort = {"ort-static-int8": _error(exc), "ort-dynamic-int8": _error(exc)}
    ort.pop("ort-fp32", None)  # the float paths are timed by fastest_float_path
    if ref.kind == "cnn":
        return ort
    dynamic = {k: v for k, v in ort.items() if k == "ort-dynamic-int8"}
    return {**torchao_models(ref.model), **quanto_models(ref.model), **dynamic}


def compactnn_contenders(ref: Any, recipes: list[str], tmp: Path, example: Any) -> list[dict]:
    """compactnn's recipes, compressed like the demo, then delivered (deployed on integer
    kernels, or on the transformer kernels); quality is that of the delivered model."""
    from compactnn.demo import measure_recipe
    from compactnn.report.delivery import deliver

    rows = []
    for recipe in recipes:
        row, model = measure_recipe(ref.name, ref, recipe, tmp, first_rows(example, 2))
        runtime, notes, delivered = "float", [], None
        if recipe != "float":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                delivered, runtime, notes = deliver(ref.kind, model, example)
        rows.append(
            {
                "name": f"compactnn {recipe}",
                "model": delivered,
                "runtime": runtime,
                "notes": notes,
                "quality": float(ref.evaluate(delivered if delivered is not None else model)),
                "size": row["size_bytes"],
                "build_s": row["compress_s"],
                "note": f"artifact (theoretical {row['theoretical_bytes']:,} B)",
            }
        )
    return rows


def peer_contenders(ref: Any, peers: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """Quality of each peer; failures (to build or to run) become findings."""
    rows, errors = [], []
    for name, res in peers.items():
        if isinstance(res, str):
            errors.append(f"{name} failed: {res}")
            continue
        try:
            quality = float(ref.evaluate(res.model))
        except Exception as exc:
            errors.append(f"{name} failed when run: {_error(exc)}")
            continue
        rows.append(
            {
                "name": name,
                "model": res.model,
                "runtime": "peer",
                "notes": [],
                "quality": quality,
                "size": res.size_bytes,
                "build_s": res.build_s,
                "note": res.saved_as,
            }
        )
    return rows, errors


def _time_all(
    float_model: Any, models: dict[str, Any], example: Any, quick: bool
) -> tuple[dict[str, FloatPaths], list[str]]:
    """Every float path of ``float_model`` and every model of ``models`` at the throughput
    batch (``"batch"``) and at batch 1 (``"one"``), side by side in rotating blocks.

    A model that fails on a probe call is dropped and its error returned as a finding.
    """
    errors = []
    for name in list(models):
        try:
            with torch.no_grad():
                model_call(models[name], example)()
                model_call(models[name], first_rows(example, 1))()
        except Exception as exc:
            errors.append(f"{name} failed when timed: {_error(exc)}")
            del models[name]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TimingWarning)  # load and spread are in the header
        for key, batch in (("batch", example), ("one", first_rows(example, 1))):
            out[key] = fastest_float_path(
                float_model, batch, quick=quick, threads=DEFAULT_THREADS, extra=models
            )
    return out, errors


def _float_table(paths: dict[str, FloatPaths], n: int) -> list[str]:
    big, one = paths["batch"], paths["one"]
    lines = [
        f"| float path | wall batch {n} | CPU batch {n} | wall batch 1 | build |",
        "|---|---|---|---|---|",
    ]
    names = [k for k in big.timings if k in big.errors]  # the float contenders that ran
    for name in names:
        t, t1 = big.timings[name], one.timings.get(name)
        lines.append(
            f"| {name} | {t.fmt()} | {_ms(t.cpu_s)} | {t1.fmt() if t1 else 'n/a'} | "
            f"{big.build_s.get(name, 0.0):.1f} s |"
        )
    lines += [f"| {name} | skipped: {why} | | | |" for name, why in big.skipped.items()]
    return lines


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _speedups(base: Any, t: Any) -> tuple[str, str]:
    wall = f"{base.median_s / t.median_s:.2f}x"
    cpu = f"{base.cpu_s / t.cpu_s:.2f}x" if base.cpu_s and t.cpu_s else "n/a"
    return wall, cpu


def verdict(ours: list[str], peers: list[str], big: Any, one: Any, n: int) -> str:
    """One sentence per batch size: compactnn's fastest compressed row and the fastest peer
    against the fastest float path (wall time), saying plainly when ours is slower.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> t = lambda s: NS(median_s=s)
        >>> big = NS(best=t(2.0), winner="ort-fp32", timings={"w8": t(1.0), "peer": t(0.5)})
        >>> one = NS(best=t(1.0), winner="ort-fp32", timings={"w8": t(1.25), "peer": t(2.0)})
        >>> verdict(["w8"], ["peer"], big, one, 16).split(". ")[1]
        'Batch 1: w8 is 0.80x the fastest float path (ort-fp32), slower than float; the fastest \
peer, peer, 0.50x.'
    """
    parts = []
    for label, paths in ((f"Batch {n}", big), ("Batch 1", one)):
        timed = {k: v for k, v in paths.timings.items() if k in ours}
        if not timed:
            continue
        best = min(timed, key=lambda k: timed[k].median_s)
        ratio = paths.best.median_s / timed[best].median_s
        head = "compactnn's fastest compressed row, " if not parts else ""
        text = f"{label}: {head}{best}{',' if head else ''} is {ratio:.2f}x the fastest float "
        text += f"path ({paths.winner})" + (", slower than float" if ratio < 1 else "")
        rivals = {k: v for k, v in paths.timings.items() if k in peers}
        if rivals:
            peer = min(rivals, key=lambda k: rivals[k].median_s)
            text += (
                f"; the fastest peer, {peer}, {paths.best.median_s / rivals[peer].median_s:.2f}x"
            )
        parts.append(text + ".")
    return " ".join(parts)


def model_section(name: str, quick: bool) -> str:
    """Markdown for one reference model: float paths, then compactnn and peer rows."""
    from compactnn.models import load_reference

    ref = load_reference(name, progress=False)
    example = first_rows(ref.example, QUICK_BATCH) if quick else ref.example
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-") as tmp:
        rows = compactnn_contenders(ref, RECIPES[name], Path(tmp), example)
    peers, errors = peer_contenders(ref, int8_peers(ref))
    timed_rows = [r for r in rows + peers if r["model"] is not None and r["runtime"] != "simulated"]
    paths, timing_errors = _time_all(
        ref.model, {r["name"]: r["model"] for r in timed_rows}, example, quick
    )
    errors += timing_errors
    big, one = paths["batch"], paths["one"]
    base_q = rows[0]["quality"]
    float_size, n = float_artifact_bytes(ref.model), batch_size_of(example)
    lines = [f"### {name}", "", f"Float paths ({DEFAULT_THREADS} threads):", ""]
    lines += _float_table(paths, n)
    lines += [
        "",
        f"Fastest float path: **{big.winner}** at batch {n}, **{one.winner}** at batch 1 "
        "(the speed baselines below; speedups by wall time and by CPU time).",
        "",
        f"| contender | runs on | quality | vs float | size on disk | x smaller | wall batch {n} "
        "| speedup | CPU speedup | wall batch 1 | speedup | compress | size measured as |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + peers:
        size = f"{r['size']:,} B" if r["size"] else "n/a"
        ratio = f"{float_size / r['size']:.2f}x" if r["size"] else "n/a"
        cells = ["", "", "", "", ""]
        if r["name"] in big.timings:
            t, t1 = big.timings[r["name"]], one.timings[r["name"]]
            wall, cpu = _speedups(big.best, t)
            cells = [t.fmt(), wall, cpu, t1.fmt(), _speedups(one.best, t1)[0]]
        elif r["runtime"] == "simulated":
            cells = ["simulated: not timed", "n/a", "n/a", "", "n/a"]
        elif r["model"] is None:  # the float model: its paths are the table above
            cells = [big.best.fmt(), "1.00x", "1.00x", one.best.fmt(), "1.00x"]
            r = {**r, "runtime": f"{big.winner} (batch {n}), {one.winner} (batch 1)"}
        lines.append(
            f"| {r['name']} | {r['runtime']} | {fmt_quality(ref.metric, r['quality'])} | "
            f"{fmt_quality(ref.metric, r['quality'] - base_q, delta=True)} | {size} | {ratio} | "
            + " | ".join(cells)
            + f" | {r['build_s']:.2f} s | {r['note']} |"
        )
    lines += ["", verdict([r["name"] for r in rows[1:]], [r["name"] for r in peers], big, one, n)]
    notes = [f"{r['name']}: {note}" for r in rows for note in r["notes"]]
    if notes:
        lines += ["", "Delivery notes:", ""] + [f"- {n}" for n in notes]
    if errors:
        lines += ["", "Peer failures (findings):", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure the foundation section and return its Markdown."""
    from compactnn.measure.environment import environment

    previous = torch.get_num_threads()
    threads = set_threads(DEFAULT_THREADS)
    try:
        sections = [model_section(name, quick) for name in RECIPES]
    finally:
        torch.set_num_threads(previous)
    env = environment(threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    intro = (
        f"## Foundation: round-to-nearest quantization, delivered, vs float and peers\n\n"
        f"Regenerate: `{COMMAND}{' --quick --out docs/benchmarks.md' if quick else ''}`"
        f"{QUICK_NOTE if quick else ''}\n\n"
        + "; ".join(f"{k}: {v}" for k, v in env.items())
        + f"; load average after timing {load:.1f}.\n\n"
        "Every compactnn row is the model a user runs: `compactnn.deploy` (oneDNN or ONNX "
        "Runtime int8, chosen by measurement) for the CNN, `compactnn.to_kernels` for "
        "MiniLM; its quality is measured on that delivered model. Each contender (float "
        "paths, compactnn rows, peers) is timed in its own block of calls after a short "
        f"pause, in {3 if quick else 9} rotating rounds; medians, min-max in brackets when "
        "they spread over 10%; CPU time is the process's over the block. Quality: top-1 on "
        "the held-out test split (mnist-cnn) or mean cosine of sentence embeddings vs float "
        "(minilm). Size: bytes on disk; x smaller is against the float model saved as a "
        "compactnn artifact."
    )
    return "\n\n".join([intro, *sections]) + "\n"
