"""Benchmark section ``ternarybert``: TernaryBERT on MiniLM against 2-bit GPTQ with tuning.

Rows, each against the float model in the same run (mean cosine of the sentence embeddings of
256 held-out sentences; bytes of the saved artifact):

* ``w2-g32-gptq_tune``: weight-only 2 bits in groups of 32 (GPTQ, then block tuning);
* ``w2a8-ternarybert`` with 0 steps: ternary weights and 8-bit activations, no training
  (plain row-wise ternarisation: what the distillation has to recover);
* ``w2a8-ternarybert``: the same, distilled from the float model on the 512 unlabeled
  calibration sentences (hidden states and attention maps).

Target (issue 19): TernaryBERT's mean cosine >= 0.95 and above ``w2-g32-gptq_tune`` at equal
or smaller size.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

import compactnn
from compactnn.measure.environment import cpu_description
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.measure.timing import set_threads
from compactnn.recipe import Recipe, Step, resolve_recipe

THREADS = 2
COMMAND = "python -m compactnn.bench --only ternarybert"


def _ternarybert(steps: int) -> Recipe:
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, steps=steps)
    return Recipe(f"w2a8-ternarybert ({steps} steps)", (Step("ternarybert", config),))


def _row(ref, recipe, tmp: Path) -> dict:
    name = recipe if isinstance(recipe, str) else recipe.name
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    secs = time.perf_counter() - t0
    path = tmp / f"a{len(list(tmp.iterdir()))}"
    compactnn.save(q, path)
    cos = ref.evaluate(q)
    print(f"[bench] ternarybert: {name} cosine {cos:.4f} ({secs:.0f} s)", file=sys.stderr)
    return {"name": name, "cos": cos, "bytes": artifact_bytes(path), "secs": secs}


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.models import load_reference

    set_threads(THREADS)
    ref = load_reference("minilm", progress=False)
    fbytes = float_artifact_bytes(ref.model)
    steps = 60 if quick else 400
    recipes = ["w2-g32-gptq_tune", _ternarybert(0), _ternarybert(steps)]
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-tb-") as tmp:
        rows = [_row(ref, r, Path(tmp)) for r in recipes]
    lines = [
        f"CPU: {cpu_description()}; {THREADS} threads. Float artifact {fbytes:,} bytes.",
        "",
        "| recipe | mean cosine | artifact bytes | smaller than float | compress (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['cos']:.4f} | {r['bytes']:,} | {fbytes / r['bytes']:.1f}x | "
            f"{r['secs']:.0f} |"
        )
    gptq, tb = rows[0], rows[-1]
    met = tb["cos"] >= 0.95 and tb["cos"] > gptq["cos"] and tb["bytes"] <= gptq["bytes"]
    lines += [
        "",
        "Target (cosine >= 0.95, above w2-g32-gptq_tune at equal or smaller size): "
        + ("met." if met else "not met."),
        "",
        f"Reproduce: `{COMMAND}`" + (" (quick: 60 steps)." if quick else "."),
    ]
    return "\n".join(lines)
