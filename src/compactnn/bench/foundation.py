"""Benchmark section ``foundation``: plain RTN recipes on the reference models, beside the
fastest float path and peer tools, all measured in one run.

Regenerate with ``python -m compactnn.bench --only foundation``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from compactnn.bench.peers import PeerResult, float_paths, ort_models, quanto_models, torchao_models
from compactnn.core.calib import batch_size_of
from compactnn.measure.fidelity import first_rows, fmt_quality
from compactnn.measure.size import float_artifact_bytes
from compactnn.measure.timing import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    model_call,
    set_threads,
    time_round_robin,
)

COMMAND = "python -m compactnn.bench --only foundation"
QUICK_BATCH = 16  # --quick times a smaller throughput batch (a smoke test, not the protocol)
QUICK_NOTE = (
    f" (quick mode: a smoke test on a shared machine; throughput batch {QUICK_BATCH}, "
    "3 rounds; rerun without --quick for the protocol's numbers)"
)
RECIPES = {
    "mnist-cnn": ["float", "w8a8", "w4a8", "w4a4", "w2a4"],
    "minilm": ["float", "w8", "w4-g32", "w3-g32"],
}


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def float_contenders(ref: Any) -> tuple[dict[str, PeerResult | str], dict[str, Any]]:
    """Every float path (eager, torch.compile, bf16 autocast, ONNX Runtime) and the ONNX
    Runtime int8 peers built from the same export."""
    paths: dict[str, PeerResult | str] = float_paths(ref.model, ref.example, DEFAULT_THREADS)
    try:
        ort = ort_models(ref.model, ref.example, ref.calib, DEFAULT_THREADS)
    except Exception as exc:  # the export itself failed: every ORT contender fails with it
        ort = {"ort-fp32": _error(exc)}
    paths["ort-fp32"] = ort.pop("ort-fp32")
    return paths, ort


def compactnn_contenders(ref: Any, recipes: list[str], tmp: Path) -> list[dict]:
    """compactnn's recipes, measured like the demo (quality, size, compression time)."""
    from compactnn.demo import measure_recipe

    rows = []
    for recipe in recipes:
        row, model = measure_recipe(ref.name, ref, recipe, tmp, first_rows(ref.example, 2))
        rows.append(
            {
                "name": f"compactnn {recipe}",
                "model": model,
                "quality": row["quality"],
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
                "quality": quality,
                "size": res.size_bytes,
                "build_s": res.build_s,
                "note": res.saved_as,
            }
        )
    return rows, errors


def _time_all(
    models: dict[str, Any], example: Any, quick: bool
) -> tuple[dict[str, dict], list[str]]:
    """Throughput-batch and batch-1 latency of every contender, interleaved round robin.

    A contender that fails on a probe call is dropped and its error returned as a finding.
    """
    runs, warmup = (3, 1) if quick else (DEFAULT_RUNS, 3)
    errors = []
    for name in list(models):
        try:
            model_call(models[name], first_rows(example, 1))()
        except Exception as exc:
            errors.append(f"{name} failed when timed: {_error(exc)}")
            del models[name]
    out: dict[str, dict] = {name: {} for name in models}
    for key, batch in (("batch", example), ("one", first_rows(example, 1))):
        calls = {name: model_call(m, batch) for name, m in models.items()}
        for name, t in time_round_robin(calls, warmup=warmup, runs=runs).items():
            out[name][key] = t
    return out, errors


def _peers_for(ref: Any, ort: dict[str, Any]) -> dict[str, PeerResult | str]:
    if ref.kind == "cnn":
        return ort
    # static int8 (activations too) is not how transformers are usually quantized with ORT
    dynamic = {k: v for k, v in ort.items() if k == "ort-dynamic-int8"}
    return {**torchao_models(ref.model), **quanto_models(ref.model), **dynamic}


def _float_table(floats: dict[str, Any], timed: dict[str, dict], n: int) -> list[str]:
    lines = [f"| float path | latency batch {n} | latency batch 1 | build |", "|---|---|---|---|"]
    for name, res in floats.items():
        if isinstance(res, str):
            lines.append(f"| {name} | failed: {res} | | |")
        elif name not in timed:
            lines.append(f"| {name} | failed when timed (see findings) | | |")
        else:
            t = timed[name]
            lines.append(
                f"| {name} | {t['batch'].fmt()} | {t['one'].fmt()} | {res.build_s:.1f} s |"
            )
    return lines


def model_section(name: str, quick: bool) -> str:
    """Markdown for one reference model: float paths, then compactnn and peer rows."""
    from compactnn.models import load_reference

    ref = load_reference(name, progress=False)
    floats, ort = float_contenders(ref)
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-") as tmp:
        rows = compactnn_contenders(ref, RECIPES[name], Path(tmp))
    peers, errors = peer_contenders(ref, _peers_for(ref, ort))
    models = {k: v.model for k, v in floats.items() if isinstance(v, PeerResult)}
    models |= {r["name"]: r["model"] for r in rows + peers}
    example = first_rows(ref.example, QUICK_BATCH) if quick else ref.example
    timed, timing_errors = _time_all(models, example, quick)
    errors += timing_errors
    fastest = min(floats, key=lambda k: timed[k]["batch"].median_s if k in timed else 1e99)
    base_t, base_q = timed[fastest]["batch"].median_s, rows[0]["quality"]
    float_size, n = float_artifact_bytes(ref.model), batch_size_of(example)
    lines = [f"### {name}", "", f"Float paths ({DEFAULT_THREADS} threads):", ""]
    lines += _float_table(floats, timed, n)
    lines += [
        "",
        f"Fastest float path at batch {n}: **{fastest}** (the speed baseline below).",
        "",
        f"| contender | quality | vs float | size on disk | x smaller | latency batch {n} "
        "| speedup | latency batch 1 | compress | size measured as |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in rows + peers if r["name"] in timed]:
        t = timed[r["name"]]
        size = f"{r['size']:,} B" if r["size"] else "n/a"
        ratio = f"{float_size / r['size']:.2f}x" if r["size"] else "n/a"
        lines.append(
            f"| {r['name']} | {fmt_quality(ref.metric, r['quality'])} | "
            f"{fmt_quality(ref.metric, r['quality'] - base_q, delta=True)} | {size} | {ratio} | "
            f"{t['batch'].fmt()} | {base_t / t['batch'].median_s:.2f}x | {t['one'].fmt()} | "
            f"{r['build_s']:.2f} s | {r['note']} |"
        )
    if errors:
        lines += ["", "Peer failures (findings):", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure the foundation section and return its Markdown."""
    previous = torch.get_num_threads()
    threads = set_threads(DEFAULT_THREADS)
    try:
        sections = [model_section(name, quick) for name in RECIPES]
    finally:
        torch.set_num_threads(previous)
    intro = (
        f"## Foundation: round-to-nearest quantization vs float and peers\n\n"
        f"Regenerate: `{COMMAND}{' --quick' if quick else ''}`"
        f"{QUICK_NOTE if quick else ''}\n\n"
        f"torch {torch.__version__}, {threads} threads. Latency: every contender of a model "
        f"warmed up, then timed in {3 if quick else DEFAULT_RUNS} interleaved rounds (one call "
        "each per round, so a busy spell on the shared machine hits all alike); median shown, "
        "min-max in brackets when they spread over 10%. Quality: top-1 on the held-out test "
        "split (mnist-cnn) or mean cosine of sentence embeddings vs float (minilm). Size: bytes "
        "on disk; x smaller is against the float model saved as a compactnn artifact. Speedup "
        "is against the fastest float path. compactnn models run simulated (fake-quantized) "
        "layers on float kernels, so they are not faster than float; the peers run integer "
        "kernels where they have them."
    )
    return "\n\n".join([intro, *sections]) + "\n"
