"""Benchmark section ``nbits_levels``: which ``MatMulNBits`` level MiniLM gets by default.

ONNX Runtime's ``MatMulNBits`` at ``accuracy_level=4`` quantizes each block of activations to
int8 (fast, VNNI); a weight-only simulation never saw that rounding, so ``to_ort_nbits``'s
default check sends ``w4-g32-gptq`` to the exact, slower level 0. ``w4a8g-g32-gptq`` simulates
level 4's own activation grid (per token and weight group, ``s = max|a| / 127``), so its
default stays at level 4; so does ``w8a8g-g128`` (8-bit weights in groups of 128), beside the
per-channel ``w8`` whose exact default runs its 8-bit layers as two 4-bit halves. Per recipe:
the simulated model, the default delivered form (the level that runs and why), and for the
weight-only recipes level 4 forced; each row's mean cosine to the float embeddings on
held-out sentences, and batch-1 latency against the fastest float
path measured in the same run (fp32 eager and ONNX Runtime fp32 with its transformer
fusions), with the transformer bench's protocol (nine rounds of warm blocks).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.measure.environment import cpu_description
from compactnn.measure.timing import model_call, set_threads, time_blocks

THREADS = int(os.environ.get("COMPACTNN_BENCH_THREADS", "2"))
RECIPES = ("w4-g32-gptq", "w4a8g-g32-gptq", "w8a8g-g128", "w8")
CALIB = 8  # batches of 16 sentences, as the transformer bench's --quick
COMMAND = "python -m compactnn.bench --only nbits_levels"


def _delivered(q, recipe: str, example: dict, tmp: Path) -> dict[str, dict[str, Any]]:
    from compactnn.kernels.ort_nbits import to_ort_nbits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the row says which level runs and why
        default = to_ort_nbits(q, example, threads=THREADS, path=tmp / recipe / "d.onnx")
    check = default.accuracy_check or {}
    why = (
        "explained by rounding"
        if check.get("explained")
        else "fallback"
        if default.accuracy_level == 0
        else "within tolerance"
    )
    rows = {f"{recipe} default": {"model": default, "level": f"{default.accuracy_level} ({why})"}}
    if "a8g" not in recipe:  # the fast form the check refused, for comparison
        forced = to_ort_nbits(
            q, example, threads=THREADS, accuracy_level=4, path=tmp / recipe / "f.onnx"
        )
        rows[f"{recipe} accuracy_level=4"] = {"model": forced, "level": "4 (forced)"}
    return rows


def _rows(ref, tmp: Path) -> dict[str, dict[str, Any]]:
    from compactnn.bench.transformers import _floats

    floats = _floats(ref, tmp)
    rows = {k: floats[k] | {"level": "float"} for k in ("fp32-eager", "ort-fp32-fused")}
    for recipe in RECIPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = compactnn.compress(ref.model, recipe, calib_data=ref.calib[:CALIB], progress=False)
        rows[f"{recipe} simulated"] = {"model": q, "level": "simulated", "untimed": True}
        rows |= _delivered(q, recipe, ref.example, tmp)
    return rows


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.bench.transformers import _batch1
    from compactnn.data.text import sentences
    from compactnn.models import load_reference, minilm

    set_threads(THREADS)
    ref = load_reference("minilm", progress=False)
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-levels-") as tmp:
        rows = _rows(ref, Path(tmp))
        texts = sentences("eval")[: 64 if quick else 256]
        tok = minilm.load_tokenizer()
        base = minilm.embed(rows["fp32-eager"]["model"], tok, texts)
        for r in rows.values():
            r["cos"] = minilm.mean_cosine(base, minilm.embed(r["model"], tok, texts))
        b1 = _batch1(ref.example)
        calls = {n: model_call(r["model"], b1) for n, r in rows.items() if not r.get("untimed")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time_blocks(calls, warmup=2, runs=27, threads=THREADS, rounds=9, block_s=0.3)
    best = min(("fp32-eager", "ort-fp32-fused"), key=lambda n: t[n].median_s)
    lines = [
        "| row | level that runs | mean cosine to float | batch 1 | vs fastest float |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cell = "- | -"
        if name in t:
            cpu = f", cpu {t[name].cpu_s * 1e3:.2f} ms" if t[name].cpu_s else ""
            cell = f"{t[name].fmt()}{cpu} | {t[best].median_s / t[name].median_s:.2f}x"
        lines.append(f"| {name} | {r['level']} | {r['cos']:.5f} | {cell} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
    return (
        "## MiniLM on MatMulNBits: the level `to_ort_nbits` keeps by default\n\n"
        f"```\n{env}{COMMAND}{' --quick' if quick else ''}\n```\n\n"
        + "\n".join(lines)
        + f"\n\n{cpu_description()}; torch {torch.__version__}, {THREADS} threads, load average "
        f"{load:.1f} at the end. GPTQ calibrated on {CALIB * 16} sentences; quality: mean "
        f"cosine to the float embeddings of {len(texts)} held-out sentences; batch 1 = the "
        "example's first sentence unpadded, nine rotating rounds of warm blocks, median; "
        f"fastest float path: {best}.\n"
    )
