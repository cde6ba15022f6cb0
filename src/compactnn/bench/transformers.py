"""Benchmark section ``transformers``: MiniLM (all-MiniLM-L6-v2) quantized, with peers.

One row per float path, peer or compactnn recipe: mean cosine and Spearman of pairwise
similarities against the float embeddings of held-out sentences, artifact size, latency at
batch 64 and batch 1 (one sentence) as ratios to fp32 eager and to the fastest float path
(fp32 eager, ``torch.compile``, bf16 autocast, ONNX Runtime fp32), compression time and the
calibration's peak memory. compactnn rows run on ``compactnn.kernels.swap.to_kernels`` (its
defaults: the model in bfloat16, int8/int4/W8A8 kernels, dense bf16 copies from 8 rows).
Every contender is timed in the same interleaved rounds.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.measure.size import artifact_bytes
from compactnn.measure.timing import model_call, set_threads, time_round_robin

# 2 per BENCHMARKING.md. On a loaded machine OpenMP barriers spinning on a descheduled thread
# inflate every multi-threaded torch contender (not ORT's pool): run with
# OMP_WAIT_POLICY=PASSIVE (read by OpenMP at start-up), or COMPACTNN_BENCH_THREADS=1
THREADS = int(os.environ.get("COMPACTNN_BENCH_THREADS", "2"))
FLOATS = ("fp32-eager", "torch.compile", "bf16-autocast", "ort-fp32")
FULL = [
    "w8a8-smoothquant",
    "w8",
    "w4-g32",
    "w4-g32-gptq_tune",
    "w3-g32-gptq_tune",
    "w2-g32-gptq_tune",
]
QUICK = ["w8a8-smoothquant", "w8", "w4-g32"]
# peers at the same fidelity as a recipe (same weight bits; W8A8: dynamic int8 activations)
SAME_FIDELITY = {
    "w8a8-smoothquant": ("ort-dynamic-int8",),
    "w8": ("torchao-int8wo", "quanto-qint8"),
    "w4": ("torchao-int4wo-g32", "torchao-intx4wo-g32", "quanto-qint4"),
}
COMMAND = "python -m compactnn.bench --only transformers"


def _ours(ref, recipes: list[str], tmp: Path) -> dict[str, dict[str, Any]]:
    from compactnn.kernels.swap import to_kernels

    out = {}
    for r in recipes:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = compactnn.compress(ref.model, r, calib_data=ref.calib, progress=False)
        secs = time.perf_counter() - t0
        compactnn.save(q, tmp / r, force=True)
        calib = q._compactnn["extra"].get("calibration", {})
        peak = max((v["peak_rss_mib"] for v in calib.values()), default=None)
        out[r] = {"model": to_kernels(q), "size": artifact_bytes(tmp / r), "secs": secs,
                  "peak": peak, "kind": "ours"}  # fmt: skip
    return out


def _peers(ref) -> dict[str, dict[str, Any]]:
    """ONNX Runtime (fp32 is a float path), torchao and optimum-quanto, fp32 and bf16."""
    from compactnn.bench.peers import ort_models, quanto_models, torchao_models

    found: dict[str, Any] = {}
    jobs = {
        "torchao": lambda: torchao_models(ref.model, 32, bf16=True),
        "optimum-quanto": lambda: quanto_models(ref.model, bf16=True),
        "onnxruntime": lambda: ort_models(ref.model, ref.example, ref.calib, THREADS),
    }
    for tool, job in jobs.items():
        try:
            found.update(job())
        except Exception as exc:  # a peer that cannot even import is a finding
            found[tool] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out = {}
    for name, res in found.items():
        kind = "float" if name == "ort-fp32" else "peer"
        if isinstance(res, str):
            out[name] = {"error": res, "kind": kind}
        else:
            out[name] = {"model": res.model, "size": res.size_bytes, "secs": res.build_s,
                         "kind": kind}  # fmt: skip
    return out


def _quality(rows: dict, texts: list[str]) -> None:
    from compactnn.models import minilm

    tok = minilm.load_tokenizer()
    base = minilm.embed(rows["fp32-eager"]["model"], tok, texts)
    for name, row in rows.items():
        if "model" not in row:
            continue
        try:
            e = minilm.embed(row["model"], tok, texts)
        except Exception as exc:  # a contender that cannot run is a finding
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "kind": row["kind"]}
            continue
        row["cos"] = minilm.mean_cosine(base, e)
        row["spearman"] = minilm.spearman_of_similarities(base, e)


def _speed(rows: dict, batch: dict, runs: int, warmup: int) -> dict[str, str]:
    """Time every live row at batch 64 and batch 1; returns the fastest float path per column."""
    one = {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()}
    live = {n: r for n, r in rows.items() if "model" in r}
    winners = {}
    for key, b in (("b64", batch), ("b1", one)):
        calls = {n: model_call(r["model"], b) for n, r in live.items()}
        with torch.no_grad():
            timings = time_round_robin(calls, warmup=warmup, runs=runs, threads=THREADS)
        for n, t in timings.items():
            live[n][key], live[n][key + "_range"] = t.median_s, (t.min_s, t.max_s)
        floats = [n for n in FLOATS if n in live]
        winners[key] = min(floats, key=lambda n: live[n][key])
        for r in live.values():
            r[key + "_x32"] = live["fp32-eager"][key] / r[key]
            r[key + "_xbest"] = live[winners[key]][key] / r[key]
    return winners


def _fmt_row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | failed: {r['error'][:160]} |" + " |" * 12
    size = f"{r['size'] / 1e6:.1f}" if r.get("size") else "-"
    peak = f"{r['peak']:.0f}" if r.get("peak") else "-"
    secs = f"{r['secs']:.1f}" if r.get("secs") else "-"
    return (
        f"| {name} | {r['cos']:.4f} | {r['spearman']:.4f} | {size} | {r['b64'] * 1e3:.1f} | "
        f"{r['b64_x32']:.2f}x | {r['b64_xbest']:.2f}x | {r['b1'] * 1e3:.2f} | "
        f"{r['b1_x32']:.2f}x | {r['b1_xbest']:.2f}x | {secs} | {peak} |"
    )


def _table(rows: dict) -> str:
    head = (
        "| model | mean cosine | Spearman | size (MB) | batch 64 (ms) | vs fp32 | vs best float "
        "| batch 1 (ms) | vs fp32 | vs best float | build (s) | peak RSS (MiB) |\n|" + "---|" * 12
    )
    lines = [head]
    for kind in ("float", "peer", "ours"):
        lines += [_fmt_row(n, r) for n, r in rows.items() if r["kind"] == kind]
    return "\n".join(lines)


def _peer_group(recipe: str) -> tuple[str, ...]:
    key = recipe if recipe in SAME_FIDELITY else recipe.split("-")[0]
    return SAME_FIDELITY.get(key, ())


def _targets(rows: dict) -> str:
    """Per recipe: faster than fp32 eager? no slower than the fastest same-fidelity peer?"""
    lines = [
        "| recipe | batch 64 vs fp32 eager | batch 1 vs fp32 eager | fastest same-fidelity peer "
        "(batch 64 / batch 1) | batch 64 vs it | batch 1 vs it |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r["kind"] != "ours" or "b64" not in r:
            continue
        cells = [f"{r['b64_x32']:.2f}x", f"{r['b1_x32']:.2f}x"]
        names = [
            p + s for p in _peer_group(name) for s in ("", "-bf16") if "b64" in rows.get(p + s, {})
        ]
        if not names:
            cells += ["none at this bit width", "-", "-"]
        else:
            p64 = min(names, key=lambda p: rows[p]["b64"])
            p1 = min(names, key=lambda p: rows[p]["b1"])
            cells += [
                f"{p64} / {p1}",
                f"{rows[p64]['b64'] / r['b64']:.2f}x",
                f"{rows[p1]['b1'] / r['b1']:.2f}x",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.bench.peers import PeerResult, float_paths
    from compactnn.data.text import sentences
    from compactnn.models import load_reference

    set_threads(THREADS)
    ref = load_reference("minilm", progress=False)
    recipes = QUICK if quick else FULL
    rows: dict[str, dict[str, Any]] = {}
    for name, res in float_paths(ref.model, ref.example, THREADS).items():
        if isinstance(res, PeerResult):
            rows[name] = {"model": res.model, "size": None, "secs": res.build_s, "kind": "float"}
        else:
            rows[name] = {"error": res, "kind": "float"}
    rows.update(_peers(ref))
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-tf-") as tmp:
        rows.update(_ours(ref, recipes, Path(tmp)))
    n_eval = 64 if quick else 256
    _quality(rows, sentences("eval")[:n_eval])
    runs, warmup = (5, 1) if quick else (10, 2)
    winners = _speed(rows, ref.example, runs=runs, warmup=warmup)
    shape = tuple(ref.example["input_ids"].shape)
    env = "" if THREADS == 2 else f"COMPACTNN_BENCH_THREADS={THREADS} "
    if os.environ.get("OMP_WAIT_POLICY"):  # how OpenMP threads wait changes loaded timings
        env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " + env
    note = (
        f"{n_eval} held-out sentences for quality; batch 64 = {shape[0]} x {shape[1]} tokens "
        f"(padded), batch 1 = its first sentence unpadded. torch {torch.__version__}, "
        f"{platform.machine()}, torch.set_num_threads({THREADS}); median of {runs} "
        f"interleaved rounds after {warmup} warm-up call(s) each (the first calls of the "
        "compiled contenders happen earlier, in the quality pass). Fastest float path: "
        f"{winners['b64']} at batch 64, {winners['b1']} at batch 1. compactnn rows: "
        "`to_kernels(model)` defaults (bfloat16 model, W8A8 on `torch._int_mm` with compiled "
        "quantization/epilogue, int8/int4 packed kernels below 8 rows and a dense bf16 copy "
        "of the dequantized weight from 8 rows). Peers' `-bf16` rows run on a bfloat16 copy "
        "of the model. Build = compression, export or compilation time."
    )
    return (
        "## Transformers: MiniLM (all-MiniLM-L6-v2)\n\n"
        f"```\n{env}{COMMAND}{' --quick' if quick else ''}\n```\n\n"
        + _table(rows)
        + "\n\n"
        + note
        + "\n\n### Speed targets\n\n"
        + _targets(rows)
        + "\n"
    )
