"""Benchmark: the demo's trained CNN rows (``w2a8-ttq``, ``w1a1-reactnet`` on ``mnist-cnn``)
on their deployed form against the fastest float path, as the demo measures them.

The rows are built the way ``compactnn.demo`` builds them: the recipe trained once with
``compactnn.train`` (read from the cache after that), delivered with ``demo.deliver_row``
(``compactnn.deploy(backend="auto")``; a plain float model on its fastest float path), scored
by running the delivered model, and timed side by side with every float path of the float
model on the demo's latency batch (16 images, 2 threads; each contender in its own block of calls,
rotating rounds, medians). The table gives wall and CPU time per call and the speedup over
the fastest float path by each measure, the deployed and simulated top-1, the verification
gap in output steps, and for the binary model each block's kernel (int8, popcount or float,
chosen by measurement with the block's elementwise tail included). A second table times each
delivered model's runner with and without the direct kernels of ``deployment/runner.py`` (the
first-layer ``small_conv``, the two-term ``term_conv`` of TTQ's split layers and the
one-term ``term_conv`` of small plain layers) side by side
(rotating rounds, CPU time) and says whether their outputs are bit-identical.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench --only demo_rows [--quick]``.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

RECIPES = ("w2a8-ttq", "w1a1-reactnet")
THREADS = 2
COMMAND = "python -m compactnn.bench --only demo_rows"


def measure(quick: bool = False, recipes: tuple[str, ...] = RECIPES) -> tuple[dict, dict, dict]:
    """``(rows, timings, winner)``: per recipe its runtime, top-1s, verification and kernels;
    the timings of every float path and delivered row; the fastest float path's name."""
    from compactnn.data import load_mnist
    from compactnn.demo import LATENCY_BATCH, deliver_row, first_rows, time_models
    from compactnn.models import load_reference
    from compactnn.models.trained import cached_train

    torch.set_num_threads(THREADS)
    ref = load_reference("mnist-cnn", progress=False)
    batch = first_rows(ref.example, LATENCY_BATCH)
    data = load_mnist()
    rows, delivered = {}, {}
    for recipe in recipes:
        qmodel, _, _ = cached_train(ref, recipe, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast, runtime, _ = deliver_row("cnn", qmodel, batch, quick=quick, threads=THREADS)
        delivered[recipe] = fast
        verification = getattr(fast, "verification", None)
        rows[recipe] = {
            "runtime": runtime,
            "simulated": float(ref.evaluate(qmodel)),
            "deployed": float(ref.evaluate(fast)),
            "steps": float("nan") if verification is None else verification.max_diff_steps,
            "kernels": {
                k: v["kernel"] for k, v in (getattr(fast, "binary_kernels", None) or {}).items()
            },
        }
    paths = time_models(ref.model, delivered, batch, threads=THREADS, quick=quick)
    first = {r: direct_kernels_ab(m, batch, 3 if quick else 5) for r, m in delivered.items()}
    return rows, paths.timings, {"winner": paths.winner, "load": os.getloadavg(), "first": first}


# the runner's choices of direct kernels (convolutions, depthwise, Hardswish chains, linear,
# the squeeze-excitation block's 1x1 convolutions)
DIRECT = (
    "small_conv_fits",
    "term_conv_fits",
    "plain_conv_fits",
    "depthwise_fits",
    "hardswish_fits",
    "plain_linear_fits",
    "squeeze_fits",
    "dw_block_fits",
)


def direct_kernels_ab(fast, batch: torch.Tensor, rounds: int) -> dict:
    """CPU ms per call (medians of rotating rounds) of a delivered model's runner with the
    direct kernels (``new``) and with oneDNN's for every layer (``old``), output identity."""
    from compactnn.deployment import chains
    from compactnn.deployment import runner as plan

    gm = getattr(fast, "program", None)
    if gm is None or not hasattr(gm, "graph"):
        return {}
    new = plan.plan_runner(gm)
    # each check where the runner or its chain patterns call it
    saved = {(m, n): getattr(m, n) for m in (plan, chains) for n in DIRECT if hasattr(m, n)}
    if {n for _, n in saved} != set(DIRECT):
        raise RuntimeError(f"direct_kernels_ab: {set(DIRECT) - {n for _, n in saved}} not found")
    for module, name in saved:  # the runner without them: oneDNN for every layer
        setattr(module, name, lambda *modules: False)
    try:
        old = plan.plan_runner(gm)
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    runs: dict[str, list[float]] = {"old": [], "new": []}
    with torch.no_grad():
        same = torch.equal(new(batch), old(batch))
        for r in range(rounds):
            order = [("old", old), ("new", new)][:: 1 if r % 2 == 0 else -1]
            for name, f in order:
                time.sleep(0.1)  # each contender in its own block after a pause
                for _ in range(5):
                    f(batch)
                t = time.process_time()
                for _ in range(40):
                    f(batch)
                runs[name].append((time.process_time() - t) / 40 * 1e3)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {**med, "identical": same}


def table(rows: dict, timings: dict, info: dict) -> list[str]:
    """Markdown lines: float paths and delivered rows, wall and CPU time, speedups."""
    best = timings[info["winner"]]
    lines = [
        f"`{COMMAND}` (mnist-cnn, batch 16, {THREADS} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average after "
        f"timing {info['load'][0]:.1f}); fastest float path: {info['winner']}",
        "",
        "| contender | runtime | wall ms (median) | speedup | CPU ms / call | CPU speedup | "
        "simulated / deployed top-1 | verify (steps) | binary kernels |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, t in timings.items():
        row = rows.get(name)
        kernels = ""
        if row and row["kernels"]:
            kernels = ", ".join(f"{k}: {v}" for k, v in row["kernels"].items())
        top1 = "" if row is None else f"{row['simulated']:.1f} / {row['deployed']:.1f}"
        steps = "" if row is None else f"{row['steps']:.2g}"
        lines.append(
            f"| {name} | {row['runtime'] if row else 'float'} | {t.median_s * 1e3:.2f} | "
            f"{best.median_s / t.median_s:.2f}x | {t.cpu_s * 1e3:.2f} | "
            f"{best.cpu_s / t.cpu_s:.2f}x | {top1} | {steps} | {kernels} |"
        )
    return lines


def run(quick: bool = False) -> str:
    """The bench section: Markdown with the machine line and the table (``quick``: the
    demo's own quick timing, 3 rounds, no ``torch.compile``)."""
    from compactnn.measure.environment import environment

    rows, timings, info = measure(quick)
    env = environment(THREADS, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    head = [
        "## The demo's trained CNN rows, deployed, against the fastest float path",
        "",
        "; ".join(f"{k}: {v}" for k, v in env.items()),
        "",
    ]
    ab = [
        "",
        "Direct kernels (first layer with 1 input channel and the input quantization fused;",
        "TTQ's two-term layers with their requantization fused; small plain layers on the",
        "one-term kernel) against oneDNN's int8",
        "convolutions, whole delivered model, CPU ms per call (same process, rotating rounds):",
        "",
        "| row | oneDNN kernels | direct kernels | ratio | outputs bit-identical |",
        "|---|---:|---:|---:|---|",
    ]
    for recipe, r in info["first"].items():
        if r:
            ab.append(
                f"| {recipe} | {r['old']:.2f} | {r['new']:.2f} | {r['old'] / r['new']:.2f}x | "
                f"{'yes' if r['identical'] else 'no'} |"
            )
    return "\n".join(head + table(rows, timings, info) + ab) + "\n"


if __name__ == "__main__":
    print(run(quick=True))
