"""Benchmark: every <=8-bit CNN recipe deployed to int8 kernels, top-1 next to its simulation.

For each reference CNN (``mnist-cnn``, ``digits-resnet``) and recipe, the model is
compressed, deployed with ``compactnn.deploy(backend="onednn")`` (verified against the
simulation on the reference's example batch) and both are scored on the held-out test split.
The table gives simulated and deployed top-1, their difference (target: within 0.1 points),
the verification's worst difference in output steps, the layers that run as two int8 kernels
(codebooks with two terms) and the layers kept in float with the reason (target: none).

Training-aware recipes (LSQ, PACT, DoReFa, TWN, TTQ, INQ) run their post-training variant
through ``compactnn.compress`` (quantizers initialised on the calibration data, then frozen):
the frozen layers have the same form as after training. Pass ``trained=`` recipe names to use
the trained artifact instead (``compactnn.models.trained.cached_train``: trained once, then
read from the cache).

With ``timed=True`` (the default) the deployed models of one reference are also timed on its
example batch (64 images): each in its own block of calls after a short pause, three rounds in
rotating order, median milliseconds, ``w8a8`` deployed as the baseline. Run it with
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine (``shared/BENCHMARKING.md``).

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.deploy_recipes [model ...]``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

import compactnn
from compactnn.measure.timing import model_call, time_blocks

MODELS = ("mnist-cnn", "digits-resnet")
RECIPES = (
    "w4a4",
    "w2a4",
    "w4a8",
    "w4a4-qdrop",
    "w2a4-brecq",
    "w4a4-lsq",
    "w4a4-pact",
    "w4a4-dorefa",
    "w2a8-twn",
    "w2a8-ttq",
    "w5a8-inq",
)
COMMAND = "python -m compactnn.bench.deploy_recipes"
THREADS = 2


@dataclass
class RecipeRow:
    """One (model, recipe) measurement."""

    model: str
    recipe: str
    float_top1: float
    simulated_top1: float
    deployed_top1: float
    max_steps: float
    split_layers: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    trained: bool = False
    deployed_ms: float = float("nan")  # median per call on the reference's example batch
    deployed_cpu_ms: float = float("nan")  # process CPU time per call (all threads), median

    @property
    def delta(self) -> float:
        return self.deployed_top1 - self.simulated_top1


def _split_layers(deployed) -> list[str]:
    from compactnn.deployment.lowbit import SplitConv2d, SplitLinear

    program = getattr(deployed, "program", None)
    if program is None:
        return []
    return [n for n, m in program.named_modules() if isinstance(m, (SplitConv2d, SplitLinear))]


def measure_recipe(ref, recipe: str, *, trained: bool = False, keep: dict | None = None):
    """Compress ``ref.model`` with ``recipe``, deploy it on oneDNN and score both
    (``keep`` receives the deployed model under the recipe's name, for timing)."""
    start = time.perf_counter()
    if trained:
        from compactnn.data import load_digits8, load_mnist
        from compactnn.models.trained import cached_train

        data = load_digits8() if ref.name == "digits-resnet" else load_mnist()
        qmodel, _, _ = cached_train(ref, recipe, data)
    else:
        qmodel = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        deployed = compactnn.deploy(qmodel, backend="onednn", example=ref.example)
    if keep is not None:
        keep[recipe] = deployed
    return RecipeRow(
        model=ref.name,
        recipe=recipe,
        float_top1=float(ref.evaluate(ref.model)),
        simulated_top1=float(ref.evaluate(qmodel)),
        deployed_top1=float(ref.evaluate(deployed)),
        max_steps=float(deployed.verification.max_diff_steps),
        split_layers=_split_layers(deployed),
        kept_float=dict(deployed.kept_float),
        seconds=time.perf_counter() - start,
        trained=trained,
    )


def time_models(models: dict, example: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Median milliseconds per call of each model and its process CPU milliseconds per call
    (all threads), timed side by side in rotating blocks
    (:func:`compactnn.measure.timing.time_blocks`: 2 warm-ups, 15 calls in 3 rounds)."""
    calls = {k: model_call(m, example) for k, m in models.items()}
    timings = time_blocks(calls, warmup=2, runs=15, threads=THREADS, pause_s=0.05)
    nan = float("nan")
    return {k: (1000 * t.median_s, 1000 * t.cpu_s if t.cpu_s else nan) for k, t in timings.items()}


def is_training_recipe(recipe: str) -> bool:
    """Whether ``recipe`` has a training-aware step (LSQ, PACT, DoReFa, TWN, TTQ, INQ, ...):
    ``compactnn.compress`` then runs its post-training variant (quantizers initialised on the
    calibration data, then frozen, no training)."""
    from compactnn.engines.qat import QATConfig
    from compactnn.recipe import resolve_recipe

    try:
        return any(
            isinstance(s.config, QATConfig) and not getattr(type(s.config), "post_training", False)
            for s in resolve_recipe(recipe).steps
        )
    except Exception:  # an unknown recipe fails in its own row
        return False


def measure_all(
    models: tuple[str, ...] = MODELS,
    recipes: tuple[str, ...] = RECIPES,
    *,
    trained: tuple[str, ...] = (),
    threads: int = THREADS,
    timed: bool = True,
) -> list[RecipeRow]:
    """Measure every (model, recipe); a recipe that fails is reported, not raised."""
    from compactnn.models import load_reference

    torch.set_num_threads(threads)
    rows: list[RecipeRow] = []
    for name in models:
        ref = load_reference(name, progress=False)
        deployed: dict = {}
        these = (
            [] if not timed or "w8a8" in recipes else [measure_recipe(ref, "w8a8", keep=deployed)]
        )
        for recipe in recipes:
            try:
                these.append(measure_recipe(ref, recipe, trained=recipe in trained, keep=deployed))
            except Exception as e:  # a failing recipe is a finding: keep going
                these.append(
                    RecipeRow(name, recipe, float("nan"), float("nan"), float("nan"),
                              float("nan"), kept_float={"(failed)": f"{type(e).__name__}: {e}"})
                )  # fmt: skip
        if timed and deployed:
            ms = time_models(deployed, ref.example)
            for row in these:
                row.deployed_ms, row.deployed_cpu_ms = ms.get(row.recipe, (float("nan"),) * 2)
        rows += these
    return rows


def _ms(value: float) -> str:
    return "not timed" if math.isnan(value) else f"{value:.2f}"


def table(rows: list[RecipeRow]) -> list[str]:
    """Markdown lines of the results (the command above the table, the notes below it)."""
    lines = [
        f"`{COMMAND}` ({THREADS} threads; held-out test split; deployed = oneDNN int8)",
        "",
        "| model | recipe | float | simulated | deployed | deployed - simulated | "
        "verify (steps) | two-kernel layers | deployed ms (batch 64) | CPU ms (batch 64) | "
        "kept in float |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    post = []
    for r in rows:
        kept = "; ".join(f"{k} ({v})" for k, v in r.kept_float.items()) or "none"
        recipe = r.recipe + (" (trained)" if r.trained else "")
        if not r.trained and is_training_recipe(r.recipe):
            recipe += " (post-training variant)"
            post.append(r.recipe)
        lines.append(
            f"| {r.model} | {recipe} | {r.float_top1:.2f} | {r.simulated_top1:.2f} | "
            f"{r.deployed_top1:.2f} | {r.delta:+.2f} | {r.max_steps:.2g} | "
            f"{len(r.split_layers)} | {_ms(r.deployed_ms)} | {_ms(r.deployed_cpu_ms)} | {kept} |"
        )
    notes = []
    if post:
        notes.append(
            "Training recipes (" + ", ".join(dict.fromkeys(post)) + ") run their post-training "
            "variant here: `compactnn.compress` initialises their quantizers on the calibration "
            "data and freezes them, no training (the frozen layers have the trained form; "
            "`measure_all(trained=...)` deploys the trained artifact instead)."
        )
    if all(math.isnan(r.deployed_ms) for r in rows):
        notes.append("Not timed (--quick, or `timed=False`): the two ms columns say so.")
    else:
        notes.append(
            "Deployed ms: median wall time per call on the reference's example batch (64 "
            "images), every deployed model of a reference timed side by side in rotating "
            "blocks; CPU ms: process CPU time per call (all threads), which waiting for the "
            "machine's other jobs does not inflate."
        )
    return [*lines, "", *notes]


def run(quick: bool = False) -> str:
    """The bench section (``python -m compactnn.bench --only deploy_recipes``): Markdown with
    the machine line and the table; ``quick`` skips the timing."""
    from compactnn.measure.environment import environment

    rows = measure_all(timed=not quick)
    env = environment(THREADS, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    head = [
        "## Every CNN recipe on integer kernels",
        "",
        "; ".join(f"{k}: {v}" for k, v in env.items()),
        "",
    ]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    tail = ["", f"Load average after the run (1, 5, 15 min): {load} on {os.cpu_count()} CPUs."]
    return "\n".join(head + table(rows) + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rows = measure_all(tuple(args) or MODELS)
    print("\n".join(table(rows)))
    bad = [r for r in rows if r.kept_float or not abs(r.delta) <= 0.1]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
