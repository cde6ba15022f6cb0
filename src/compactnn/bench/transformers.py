"""Benchmark section ``transformers``: GPTQ / AWQ / SmoothQuant on MiniLM, with peers.

One row per recipe or peer: mean cosine and Spearman of pairwise similarities against the
float embeddings of held-out sentences, artifact size, latency of the integer-kernel model
(batch 64 and batch 1) as a ratio to the fastest float path, compression time and the
calibration's peak memory. Every contender is timed in the same interleaved rounds.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import compactnn
from compactnn.bench.measure import artifact_bytes
from compactnn.bench.timing import model_call, set_threads, time_round_robin

THREADS = 2
FULL = ["w8a8", "w8a8-smoothquant"] + [
    f"w{b}-g32{m}" for b in (4, 3, 2) for m in ("", "-mse", "-awq", "-gptq", "-gptq_tune")
]
QUICK = ["w8a8-smoothquant", "w4-g32", "w4-g32-gptq"]
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
                  "peak": peak}  # fmt: skip
    return out


def _peers(ref) -> dict[str, dict[str, Any]]:
    from compactnn.bench.peers import ort_models, quanto_models, torchao_models

    found: dict[str, Any] = {}
    for fn in (lambda: torchao_models(ref.model, 32), lambda: quanto_models(ref.model)):
        try:
            found.update(fn())
        except Exception as exc:  # a peer that cannot even import is a finding
            found[f"peer import ({type(exc).__name__})"] = str(exc)[:200]
    try:
        found.update(ort_models(ref.model, ref.example, ref.calib, THREADS))
    except Exception as exc:
        found["onnxruntime"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out = {}
    for name, res in found.items():
        if isinstance(res, str):
            out[name] = {"error": res}
        else:
            out[name] = {"model": res.model, "size": res.size_bytes, "secs": res.build_s}
    return out


def _quality(rows: dict, texts: list[str]) -> None:
    from compactnn.models import minilm

    tok = minilm.load_tokenizer()
    base = minilm.embed(rows["fp32-eager"]["model"], tok, texts)
    for row in rows.values():
        if "model" not in row:
            continue
        e = minilm.embed(row["model"], tok, texts)
        row["cos"] = minilm.mean_cosine(base, e)
        row["spearman"] = minilm.spearman_of_similarities(base, e)


def _speed(rows: dict, batch: dict, runs: int) -> str:
    one = {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()}
    live = {n: r for n, r in rows.items() if "model" in r}
    for key, b in (("b64", batch), ("b1", one)):
        calls = {n: model_call(r["model"], b) for n, r in live.items()}
        timings = time_round_robin(calls, warmup=2, runs=runs, threads=THREADS)
        for n, t in timings.items():
            rows[n][key] = t.median_s
    fastest = min(("fp32-eager", "bf16-autocast"), key=lambda n: rows[n]["b64"])
    for key in ("b64", "b1"):
        ref = min(rows["fp32-eager"][key], rows["bf16-autocast"][key])
        for r in live.values():
            r[key + "_x"] = ref / r[key]
    return fastest


def _table(rows: dict, fastest: str) -> str:
    head = (
        "| model | mean cosine | Spearman | size (MB) | batch 64 (ms) | speed-up | batch 1 (ms)"
        " | speed-up | compress (s) | peak RSS (MiB) |\n|" + "---|" * 10
    )
    lines = [head]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} |" + " |" * 8)
            continue
        size = f"{r['size'] / 1e6:.1f}" if r.get("size") else "-"
        peak = f"{r['peak']:.0f}" if r.get("peak") else "-"
        lines.append(
            f"| {name} | {r['cos']:.4f} | {r['spearman']:.4f} | {size} | {r['b64'] * 1e3:.1f} | "
            f"{r['b64_x']:.2f}x | {r['b1'] * 1e3:.2f} | {r['b1_x']:.2f}x | {r['secs']:.1f} | "
            f"{peak} |"
        )
    note = (
        f"\nSpeed-ups are against the fastest float path per column (fp32 eager or bf16 "
        f"autocast; batch 64 winner: {fastest}), timed in interleaved rounds with "
        f"torch.set_num_threads({THREADS}); our rows run on the integer kernels of "
        "`compactnn.kernels` (int8 weight-only, int4-packed group-wise, W8A8 dynamic)."
    )
    return "\n".join(lines) + "\n" + note


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.bench.peers import float_paths
    from compactnn.data.text import sentences
    from compactnn.models import load_reference

    set_threads(THREADS)
    ref = load_reference("minilm", progress=False)
    recipes = QUICK if quick else FULL
    rows: dict[str, dict[str, Any]] = {}
    for name, res in float_paths(ref.model, ref.example, THREADS, with_compile=False).items():
        rows[name] = {"model": res.model, "size": None, "secs": 0.0}
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-tf-") as tmp:
        rows.update(_ours(ref, recipes, Path(tmp)))
    if not quick:
        rows.update(_peers(ref))
    _quality(rows, sentences("eval")[: 64 if quick else 256])
    fastest = _speed(rows, ref.example, runs=3 if quick else 10)
    return (
        "## Transformers: MiniLM (all-MiniLM-L6-v2)\n\n"
        f"```\n{COMMAND}{' --quick' if quick else ''}\n```\n\n" + _table(rows, fastest) + "\n"
    )
