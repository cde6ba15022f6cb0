"""Benchmark section ``probe``: Probe Pruning on ``tiny-lm`` against static structured pruning.

At the same ratio of MLP channels (30%), held-out perplexity and the latency of one batch of
held-out windows, each against the float model in the same run:

* ``ch30``: static L1 structured pruning (channels physically removed, no calibration);
* ``pp30-static``: static Wanda-style structured pruning (``||W_down[:, j]|| * ||h_j||`` from
  the calibration data; the same channels for every batch);
* ``pp30``: Probe Pruning (5% of each batch's tokens probe the MLP; channels chosen per batch).

Target (issue 19): Probe Pruning's perplexity better than both static baselines. The probe
costs extra work on every batch, so its latency is reported as measured, gain or not.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

import compactnn
from compactnn.measure.environment import cpu_description
from compactnn.measure.timing import set_threads, time_blocks
from compactnn.models.tiny_lm import perplexity

THREADS = 2
COMMAND = "python -m compactnn.bench --only probe"
RECIPES = ("ch30", "pp30-static", "pp30")


def _row(ref, recipe: str) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    secs = time.perf_counter() - t0
    ppl, ppl1 = ref.evaluate(model), perplexity(model, _singles())
    print(f"[bench] probe: {recipe} perplexity {ppl:.3f} / {ppl1:.3f}", file=sys.stderr)
    return {"name": recipe, "ppl": ppl, "ppl1": ppl1, "secs": secs, "model": model}


def _singles() -> list:
    """The first 64 held-out windows one per batch: each window chooses its own channels."""
    from compactnn.models.tiny_lm import eval_batches

    return eval_batches(n_windows=64, batch_size=1)


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.models import load_reference
    from compactnn.models.tiny_lm import eval_batches

    set_threads(THREADS)
    ref = load_reference("tiny-lm", progress=False)
    base, base1 = ref.evaluate(ref.model), perplexity(ref.model, _singles())
    rows = [_row(ref, r) for r in RECIPES]
    batch = eval_batches(n_windows=8, batch_size=8)[0]

    def call(model):
        return lambda: model(**batch)

    with torch.inference_mode():
        timed = time_blocks(
            {"float": call(ref.model), **{r["name"]: call(r["model"]) for r in rows}},
            runs=6 if quick else 30,
            threads=THREADS,
            batch=8,
        )
    t_float = timed["float"].median_s
    lines = [
        f"CPU: {cpu_description()}; {THREADS} threads; one batch of 8 held-out windows per call.",
        "",
        "Perplexity over every held-out window in batches of 32 windows (the reference's "
        "evaluation), and over the first 64 windows one per batch (batch 1: each window "
        "chooses its own channels).",
        "",
        "| recipe | perplexity (batch 32) | vs float | perplexity (batch 1) | vs float "
        "| latency (ms) | speedup vs float | compress (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| float | {base:.3f} | 1.000x | {base1:.3f} | 1.000x | {t_float * 1e3:.1f} | 1.00x | - |",
    ]
    for r in rows:
        t = timed[r["name"]].median_s
        lines.append(
            f"| {r['name']} | {r['ppl']:.3f} | {r['ppl'] / base:.4f}x | {r['ppl1']:.3f} | "
            f"{r['ppl1'] / base1:.4f}x | {t * 1e3:.1f} | {t_float / t:.2f}x | {r['secs']:.1f} |"
        )
    verdicts = []
    for key, label in (("ppl", "batch 32"), ("ppl1", "batch 1")):
        ppl = {r["name"]: r[key] for r in rows}
        met = ppl["pp30"] < min(ppl["ch30"], ppl["pp30-static"])
        verdicts.append(f"{label} {'met' if met else 'not met'}")
    lines += [
        "",
        "Target (Probe Pruning's perplexity below static L1 and static Wanda-style at 30%): "
        + "; ".join(verdicts)
        + ".",
        "",
        f"Reproduce: `{COMMAND}`.",
    ]
    return "\n".join(lines)
