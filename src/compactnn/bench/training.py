"""Benchmark section ``training``: training-aware recipes on ``mnist-cnn``, each beside its
post-training counterpart at the same bits and the float model, all measured in one run.

Regenerate with ``python -m compactnn.bench --only training``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import compactnn
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.measure.timing import set_threads, time_model

COMMAND = "python -m compactnn.bench --only training"
# (training recipe, post-training counterpart at the same bits, target: max points below float)
ROWS = [
    ("w4a4-lsq", "w4a4", 0.5),
    ("w4a4-pact", "w4a4", 0.5),
    ("w2a2-lsq", "w2a2", 2.0),
    ("w2a8-ttq", "w2a8", 1.5),
    ("w2a8-twn", "w2a8", 1.5),
    ("w1a1-bireal", "w1a1", 5.0),
    ("w1a1-reactnet", "w1a1", 5.0),
    ("w1a1-xnor", "w1a1", None),
    ("w5-inq", "w5", 0.5),
]


def _saved(model, tmp: Path, name: str) -> tuple[int, torch.nn.Module]:
    """Bytes of ``model``'s artifact, and the model loaded back from it."""
    from compactnn.models import load_reference

    path = tmp / name
    compactnn.save(model, path)
    skeleton = load_reference("mnist-cnn", progress=False).skeleton()
    return artifact_bytes(path), compactnn.load(path, model=skeleton)


def _all_powers_of_two(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if hasattr(m, "weight_codes"):
            nz = m.weight[m.weight != 0].abs()
            if not torch.equal(torch.log2(nz), torch.log2(nz).round()):
                return False
    return True


def _latency_ms(model, example, quick: bool) -> float:
    runs, warmup = (3, 1) if quick else (10, 3)
    return time_model(model, example, threads=2, runs=runs, warmup=warmup).median_s * 1e3


def _row(ref, split, recipe, ptq_name, target, float_top1, tmp, quick) -> dict:
    epochs = 1 if quick else None
    t0 = time.perf_counter()
    trained = compactnn.train(ref.model, recipe, split, epochs=epochs, progress=False)
    seconds = time.perf_counter() - t0
    size, reloaded = _saved(trained, tmp, recipe)
    top1 = ref.evaluate(reloaded)  # the artifact as loaded back, not the in-memory model
    ptq = compactnn.compress(ref.model, ptq_name, calib_data=ref.calib, progress=False)
    ptq_top1 = ref.evaluate(ptq)
    gap = float_top1 - top1
    return {
        "recipe": recipe,
        "epochs": trained._compactnn["extra"]["training"]["epochs"],
        "top1": top1,
        "gap": gap,
        "ptq": ptq_name,
        "ptq_top1": ptq_top1,
        "target": target,
        "met": None if target is None else gap <= target,
        "bytes": size,
        "latency_ms": _latency_ms(reloaded, ref.example, quick),
        "train_s": seconds,
        "pow2": _all_powers_of_two(reloaded) if recipe.endswith("inq") else None,
    }


def _table(rows: list[dict], float_top1: float, float_bytes: int, float_ms: float) -> str:
    head = (
        "| recipe | epochs | top-1 % | vs float | post-training (same bits) | top-1 % | target "
        "| met | artifact | size vs float | latency ms (x float) | train s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| float | - | {float_top1:.1f} | - | - | - | - | - | {float_bytes / 1024:.1f} KiB "
        f"| 1.00x | {float_ms:.2f} (1.00) | - |\n"
    )
    lines = []
    for r in rows:
        target = "report" if r["target"] is None else f"<= {r['target']:.1f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        if r["pow2"] is not None:
            met += ", all 0 or +-2^k" if r["pow2"] else ", **not all powers of two**"
        lines.append(
            f"| {r['recipe']} | {r['epochs']} | {r['top1']:.1f} | {-r['gap']:+.1f} "
            f"| {r['ptq']} (RTN) | {r['ptq_top1']:.1f} | {target} | {met} "
            f"| {r['bytes'] / 1024:.1f} KiB | {float_bytes / r['bytes']:.2f}x smaller "
            f"| {r['latency_ms']:.2f} ({r['latency_ms'] / float_ms:.2f}) | {r['train_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    """Train every training recipe on ``mnist-cnn`` and return the Markdown section."""
    from compactnn.data.mnist import DESCRIPTION, load_mnist
    from compactnn.models import load_reference

    threads = set_threads(2)
    ref = load_reference("mnist-cnn", progress=False)
    split = load_mnist()
    float_top1 = ref.evaluate(ref.model)
    float_bytes = float_artifact_bytes(ref.model)
    float_ms = _latency_ms(ref.model, ref.example, quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-train-") as tmp:
        for recipe, ptq_name, target in ROWS:
            rows.append(_row(ref, split, recipe, ptq_name, target, float_top1, Path(tmp), quick))
            print(f"[training] {rows[-1]}", file=sys.stderr, flush=True)  # partial results
    quick_note = " **Quick run: 1 epoch per recipe; targets are for full runs.**" if quick else ""
    return (
        "## Training-aware compression (mnist-cnn)\n\n"
        f"```\n{COMMAND}\n```\n\n"
        f"torch threads: {threads}. Data: {DESCRIPTION}; top-1 on the 1,000 held-out digits, "
        "scored on each artifact after saving and loading it back. Every recipe runs "
        "`compactnn.train` with its documented defaults (docs/training.md), seed 0; the "
        "post-training counterpart is round-to-nearest at the same bits (first and last "
        "layers at 8 bits), calibrated on the reference calibration batches. Latency: "
        "median of the batch of `ref.example`, eager fp32 float model as the baseline. "
        "One seed per recipe (training is deterministic at a fixed seed)."
        f"{quick_note}\n\n" + _table(rows, float_top1, float_bytes, float_ms)
    )
