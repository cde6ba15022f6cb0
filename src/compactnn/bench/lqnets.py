"""Benchmark: LQ-Nets (learned binary-basis quantizers) against LSQ on ``mnist-cnn``.

Both recipes train with their defaults (the same schedule: 4 epochs, Adam at 1e-3 with
cosine decay, distillation 0.5 at T=4 from the float model, first and last layers at 8 bits)
from the cached float reference, one run per seed. Each trained model is saved, loaded back
(outputs checked ``torch.equal``) and the *loaded* artifact is scored on the 1,000 held-out
digits. Bytes are ``model.safetensors``; bits per weight are everything the artifact stores
for a weight (codes, scales, zero points, codebook levels or basis) over its weights
(:func:`compactnn.export.size.stored_bits`), for the low-bit layers and for all quantized
layers. Target (issue 18): ``w2a2-lqnets`` within 0.5 points of ``w2a2-lsq`` or above.

``quick``: one seed, one epoch. Run on a quiet machine:
``python -m compactnn.bench.lqnets`` (``--quick``), one thread per process.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import compactnn
import compactnn.quant.lqnets  # registers "lqnets" (until methods.py imports it)
from compactnn.core.qlayers import is_quant_layer
from compactnn.export.size import stored_bits

COMMAND = "python -m compactnn.bench.lqnets"
MAIN = ("w2a2-lqnets", "w2a2-lsq")
EXTRA = ("w1a2-lqnets", "w3a3-lqnets", "w3a3-lsq")  # one seed, appended when not quick
PAPER = "ResNet-18 on ImageNet, W/A 1/2 62.6, 2/2 64.9, 3/3 68.2, 4/4 69.3"


def _bits(path: Path, model: torch.nn.Module) -> tuple[float, float]:
    """Stored bits per weight: ``(low-bit layers, all quantized layers)``."""
    per_layer = stored_bits(path)
    low = {
        n: m.weight.numel()
        for n, m in model.named_modules()
        if is_quant_layer(m) and m.weight_spec.bits < 8 and n in per_layer
    }
    n_low = sum(low.values())
    low_bits = sum(per_layer[n] * k for n, k in low.items()) / max(n_low, 1)
    return low_bits, per_layer.get("total", float("nan"))


def measure(ref, split, recipe: str, seed: int, epochs: int | None, tmp: Path) -> dict:
    """Train ``recipe`` with ``seed``, save, load, score the loaded artifact."""
    kw = {"epochs": epochs} if epochs else {}
    start = time.perf_counter()
    q = compactnn.train(ref.model, recipe, split, seed=seed, progress=False, **kw)
    seconds = time.perf_counter() - start
    path = tmp / f"{recipe}-{seed}"
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    low_bits, all_bits = _bits(path, q)
    row = {
        "recipe": recipe,
        "seed": seed,
        "top1": ref.evaluate(loaded),
        "exact": torch.equal(q(ref.example), loaded(ref.example)),
        "bytes": os.path.getsize(path / "model.safetensors"),
        "low_bits": low_bits,
        "all_bits": all_bits,
        "seconds": seconds,
    }
    print(f"[lqnets] {row}", file=sys.stderr, flush=True)
    return row


def _table(rows: list[dict], recipes: tuple[str, ...]) -> list[str]:
    lines = [
        "| recipe | seeds | top-1 mean | min-max | bytes | bits/weight (low-bit layers) "
        "| bits/weight (all quantized) | load bit-exact | train s/run |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for recipe in recipes:
        rs = [r for r in rows if r["recipe"] == recipe]
        if not rs:
            continue
        top = [r["top1"] for r in rs]
        lines.append(
            f"| `{recipe}` | {', '.join(str(r['seed']) for r in rs)} "
            f"| {statistics.mean(top):.2f} | {min(top):.1f}-{max(top):.1f} "
            f"| {rs[0]['bytes']:,} | {rs[0]['low_bits']:.2f} | {rs[0]['all_bits']:.2f} "
            f"| {'yes' if all(r['exact'] for r in rs) else 'NO'} "
            f"| {statistics.median(r['seconds'] for r in rs):.0f} |"
        )
    return lines


def _verdict(rows: list[dict]) -> str:
    mean = {
        k: statistics.mean(r["top1"] for r in rows if r["recipe"] == k)
        for k in MAIN
        if any(r["recipe"] == k for r in rows)
    }
    if len(mean) < 2:
        return ""
    gap = mean[MAIN[0]] - mean[MAIN[1]]
    met = "met" if gap >= -0.5 else "not met"
    return (
        f"\n`w2a2-lqnets` - `w2a2-lsq` = {gap:+.2f} points (mean over the seeds); target "
        f"within 0.5 points or above: **{met}**.\n"
    )


def run(quick: bool = False) -> str:
    """Train, save, load and score every row; return the Markdown section."""
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    torch.set_num_threads(1)
    ref = load_reference("mnist-cnn", progress=False)
    split = load_mnist()
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 1 if quick else None  # None: the recipes' defaults (4 epochs for both)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-lqnets-") as tmp:
        for seed in seeds:
            for recipe in MAIN:
                rows.append(measure(ref, split, recipe, seed, epochs, Path(tmp)))
        extra = () if quick else EXTRA
        for recipe in extra:
            rows.append(measure(ref, split, recipe, 0, epochs, Path(tmp)))
    float_top1 = ref.evaluate(ref.model)
    out = [
        "\n## LQ-Nets (mnist-cnn, trained)\n",
        f"Seeds {list(seeds)}; epochs: {'1 (quick)' if quick else 'recipe default (4)'}; "
        "first and last layers at 8 bits; top-1 of the loaded artifact on 1,000 held-out "
        f"digits. Float top-1: {float_top1:.2f}. One thread. Rows after the first two: one "
        "seed.\n",
        *_table(rows, MAIN + extra),
        _verdict(rows),
        f"Paper (for reference): {PAPER}.\n",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
