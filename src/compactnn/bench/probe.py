"""Benchmark section ``probe``: Probe Pruning on ``tiny-lm`` against static structured pruning.

At the same ratio of MLP channels (30%), held-out perplexity in batches of 32 windows and one
window per batch, perplexity on 128 training-text windows (a second text set: the defaults
were chosen on the held-out windows), the probe's extra multiply-adds and the latency of one
batch of held-out windows, each against the float model in the same run:

* ``ch30``: static L1 structured pruning (channels physically removed, no calibration);
* ``pp30-static``: static Wanda-style structured pruning (``||W_down[:, j]|| * ||h_j||`` from
  the calibration data; the same channels for every batch);
* ``static, PPsp score``: the same statistics with the paper's score (no probe);
* ``paper batch-wise``: the paper's rule (one channel set per batch; probe of 5% of the
  samples x 50% of the positions with the largest residual norm);
* ``pp30``: the default: one probe of 15% of the positions (evenly spaced) per sample, and
  one channel set per sample;
* ``per sample, 100% probe, no history``: the oracle of the per-sample rule (the probe is
  the whole input: costs two thirds of a dense MLP on top).

Target (issue 19): Probe Pruning's perplexity better than both static baselines. Everything
is deterministic (no sampling in the probe): a rerun gives the same perplexities, so the
margins have no run-to-run spread; they are small and say so.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

import compactnn
from compactnn.measure.environment import cpu_description
from compactnn.measure.timing import set_threads, time_blocks
from compactnn.models.tiny_lm import perplexity
from compactnn.prune.probe import ProbePruneConfig, probe_flops_fraction
from compactnn.recipe import Recipe, Step

THREADS = 1
COMMAND = "python -m compactnn.bench --only probe"
T = 128  # tiny-lm's context: every window has 128 tokens


def _pp(label: str, **kw) -> tuple[str, Recipe, ProbePruneConfig]:
    cfg = ProbePruneConfig(**kw)
    return label, Recipe(label, (Step("probe", cfg),)), cfg


def _arms(ratio: float) -> list[tuple[str, object, ProbePruneConfig | None]]:
    p = round(ratio * 100)
    return [
        (f"ch{p}", f"ch{p}", None),
        (f"pp{p}-static", f"pp{p}-static", ProbePruneConfig(ratio=ratio, mode="static")),
        _pp("static, PPsp score", ratio=ratio, mode="static"),
        _pp("paper batch-wise", ratio=ratio, mode="batch", tokens=0.5, select="residual"),
        (f"pp{p}", f"pp{p}", ProbePruneConfig(ratio=ratio)),
        _pp("per sample, 100% probe, no history", ratio=ratio, tokens=1.0, history=0.0),
    ]


def _data():
    from compactnn.models.tiny_lm import as_batches, eval_batches, split_ids, windows

    w = windows(split_ids("train"), T)
    train = w[len(w) // 2 + 3 : len(w) // 2 + 3 + 128]  # 128 consecutive training windows
    return {
        "b32": eval_batches(batch_size=32),
        "b1": eval_batches(n_windows=64, batch_size=1),
        "train": as_batches(train, 32),
    }


def _row(ref, data, label, recipe, cfg) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    secs = time.perf_counter() - t0
    ppl = {k: perplexity(model, v) for k, v in data.items()}
    print(f"[bench] probe: {label} perplexity {ppl}", file=sys.stderr)
    flops = (
        None if cfg is None else (probe_flops_fraction(cfg, 32, T), probe_flops_fraction(cfg, 1, T))
    )
    return {"name": label, "ppl": ppl, "secs": secs, "model": model, "flops": flops}


def _table(rows: list[dict], base: dict, timed: dict | None) -> list[str]:
    head = (
        "| recipe | batch 32 | batch 1 | train text | probe cost (batch 32 / 1) "
        "| latency, wall / CPU (ms) | speedup (CPU) | compress (s) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    ft = timed["float"] if timed else None
    lat, one = (f"{ft.median_s * 1e3:.1f} / {ft.cpu_s * 1e3:.1f}", "1.00x") if ft else ("-", "-")
    lines.append(
        f"| float | {base['b32']:.3f} | {base['b1']:.3f} | {base['train']:.3f} | - | {lat} "
        f"| {one} | - |"
    )
    for r in rows:
        f = r["flops"]
        cost = "-" if f is None else f"{f[0]:.1%} / {f[1]:.1%}"
        t = timed[r["name"]] if timed and r["name"] in timed else None
        lat = "-" if t is None else f"{t.median_s * 1e3:.1f} / {t.cpu_s * 1e3:.1f}"
        speed = "-" if t is None else f"{ft.cpu_s / t.cpu_s:.2f}x"
        p = r["ppl"]
        lines.append(
            f"| {r['name']} | {p['b32']:.3f} | {p['b1']:.3f} | {p['train']:.3f} | {cost} "
            f"| {lat} | {speed} | {r['secs']:.1f} |"
        )
    return lines


def _verdicts(rows: list[dict], p: int) -> str:
    by = {r["name"]: r["ppl"] for r in rows}
    out = []
    for key, label in (("b32", "batch 32"), ("b1", "batch 1"), ("train", "train text")):
        best_static = min(by[f"ch{p}"][key], by[f"pp{p}-static"][key])
        margin = best_static - by[f"pp{p}"][key]
        out.append(f"{label} {'met' if margin > 0 else 'not met'} (margin {margin:+.3f})")
    return "; ".join(out)


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown (``quick``: 30% only, fewer timed runs)."""
    from compactnn.models import load_reference
    from compactnn.models.tiny_lm import eval_batches

    set_threads(THREADS)
    ref = load_reference("tiny-lm", progress=False)
    data = _data()
    base = {k: perplexity(ref.model, v) for k, v in data.items()}
    rows = [_row(ref, data, *arm) for arm in _arms(0.3)]
    batch = eval_batches(n_windows=8, batch_size=8)[0]
    timed_names = ("ch30", "pp30-static", "paper batch-wise", "pp30")

    def call(model):
        return lambda: model(**batch)

    with torch.inference_mode():
        timed = time_blocks(
            {"float": call(ref.model)}
            | {r["name"]: call(r["model"]) for r in rows if r["name"] in timed_names},
            runs=6 if quick else 30,
            threads=THREADS,
            batch=8,
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"CPU: {cpu_description()}; {THREADS} thread; latency: one batch of 8 held-out windows "
        f"per call, medians of wall and process CPU time (load average after timing "
        f"{load:.1f}: on a loaded machine compare the CPU times).",
        "",
        "Perplexity at 30% of the MLP channels: every held-out window in batches of 32 (the "
        "reference's evaluation), the first 64 held-out windows one per batch, and 128 "
        "training-text windows in batches of 32. Probe cost: the probe's multiply-adds as a "
        "fraction of the dense MLP's (the skipped channels save 30% of them).",
        "",
        *_table(rows, base, timed),
        "",
        "Target (Probe Pruning's perplexity below static L1 and static Wanda-style at 30%): "
        + _verdicts(rows, 30)
        + ".",
    ]
    if not quick:
        rows50 = [_row(ref, data, *arm) for arm in _arms(0.5)]
        lines += ["", "At 50%:", "", *_table(rows50, base, None)]
        lines += ["", "Target at 50%: " + _verdicts(rows50, 50) + "."]
    lines += ["", f"Reproduce: `{COMMAND}` (quick: 30% only)."]
    return "\n".join(lines)
