"""Benchmark section ``pewise``: PE-wise structured pruning with ternarization (issue 19).

Every arm is ``compactnn.train`` of the same float model with ``PEWiseConfig`` (PE tile
``(1, 8)``: one output channel x eight input channels, the whole 3x3 window), scored on the
held-out split after saving and loading the artifact back:

* joint: ternary weights while the tile masks grow (``w2a8-pe<P>``);
* sequential: prune with float weights, then ternarize, same epochs (``w2a8-pe<P>-seq``);
* ternary alone: the same method at 0% tiles (TWN's closed form, same schedule);
* PE pruning alone: int8 weights under the same tile masks (first and last layers left in
  float: the 8-bit convention of the ternary arms does not exist at 8 bits).

The table gives top-1 (mean ± spread over seeds), the artifact's bytes (ternary codes of the
pruned tiles stored sparsely by the artifact), and the fraction of the pruned layers' PE tiles
that are all zero. The CPU deploy path is timed on the example batch: joint at the highest
sparsity against ternary alone, both on oneDNN int8 (dense kernels: a zero tile is still
computed), side by side in rotating blocks.

``run(quick=True)``: mnist-cnn, one seed, 2 epochs, 50% tiles; ``run()``: three seeds, the
method's 6 epochs, 50% and 75% tiles, mnist-cnn and digits-resnet. Regenerate with
``python -m compactnn.bench --only pewise`` (after the lead registers the section) or
``python -m compactnn.bench.pewise [--quick] [--pair]`` (``--pair``: joint and sequential
only, mnist-cnn, 3 seeds at 50% and 75%: the issue's target; ``--levers``: the joint arm's
options at 50% (``--75``: at 75%) on a validation split of the training digits, see
:func:`levers`).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import compactnn
from compactnn.core.modules import Targets
from compactnn.measure.size import artifact_bytes
from compactnn.prune.pewise import PEWiseConfig, group_norms
from compactnn.quant.base import short_weight_spec
from compactnn.recipe import Recipe, Step

COMMAND = "python -m compactnn.bench.pewise"
GROUP = (1, 8)


def reference(name: str):
    """``(Reference, training split)`` of ``name``."""
    from compactnn.data.digits import load_digits8
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    split = load_digits8() if name == "digits-resnet" else load_mnist()
    return load_reference(name, progress=False), split


def validation_split(split, share: float = 0.15):
    """``((x, y) to train on, (x_val, y_val))``: the last ``share`` of the training examples
    held out, for choosing settings without looking at the test split."""
    n = split.x_train.shape[0] - round(share * split.x_train.shape[0])
    x, y = split.x_train, split.y_train
    return (x[:n], y[:n]), (x[n:], y[n:])


def first_last(model: nn.Module) -> tuple[str, str]:
    """Names of the first and last weight layers (module order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[0], names[-1]


def arms(model: nn.Module, sparsities: tuple[float, ...]) -> list[tuple[str, str, Recipe]]:
    """``(arm, sparsity label, recipe)``: joint and sequential at each sparsity first (the
    comparison), then ternary alone and PE pruning alone."""
    out = []
    for s in sparsities:
        p = round(100 * s)
        for schedule, tag in (("joint", ""), ("sequential", "-seq")):
            cfg = PEWiseConfig(group=GROUP, sparsity=s, schedule=schedule)
            out.append((schedule, f"{p}%", Recipe(f"w2a8-pe{p}{tag}", (Step("pe", cfg),))))
    ternary = PEWiseConfig(group=GROUP, sparsity=0.0)
    out.append(("ternary alone", "0%", Recipe("w2a8-pe0", (Step("pe", ternary),))))
    targets = Targets(ignore=first_last(model))
    for s in sparsities:
        cfg = PEWiseConfig(group=GROUP, sparsity=s, weight=short_weight_spec(8))
        name = f"w8a8-pe{round(100 * s)}"
        out.append(("PE pruning alone (int8)", f"{round(100 * s)}%", _recipe(name, cfg, targets)))
    return out


def _recipe(name: str, cfg: PEWiseConfig, targets: Targets) -> Recipe:
    return Recipe(name, (Step("pe", cfg, targets),))


def tile_stats(qmodel: nn.Module, skip: tuple[str, ...]) -> tuple[float, float]:
    """``(zero tiles / tiles of the pruned layers, weights in zero tiles / all weights)``:
    pruned layers are the quantized layers whose channels the tile divides, less ``skip``
    (the first and last layers, never pruned); all weights: every Conv2d / Linear."""
    kinds = (nn.Conv2d, nn.Linear)
    total_w = sum(m.weight.numel() for m in qmodel.modules() if isinstance(m, kinds))
    zero_tiles = tiles = zero_w = 0
    for n, m in qmodel.named_modules():
        if not hasattr(m, "weight_codes") or n in skip:
            continue
        w = m.weight.detach()
        if w.shape[0] % GROUP[0] or w.shape[1] % GROUP[1]:
            continue
        z = group_norms(w, GROUP) == 0
        zero_tiles, tiles = zero_tiles + int(z.sum()), tiles + z.numel()
        zero_w += int(z.sum()) * w.numel() // z.numel()
    return zero_tiles / max(tiles, 1), zero_w / max(total_w, 1)


def train_score(
    ref, split, recipe: Recipe, seed: int, epochs: int | None, tmp: Path, val=None
) -> dict:
    """Train, save, load back, score: top-1 of the reloaded artifact, bytes, zero tiles.

    ``val``: ``(x, y)`` scored instead of the held-out split (``split`` is then the training
    pair, see :func:`validation_split`)."""
    t0 = time.perf_counter()
    q = compactnn.train(ref.model, recipe, split, epochs=epochs, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    path = tmp / f"{recipe.name}-{seed}"
    compactnn.save(q, path)
    reloaded = compactnn.load(path, model=ref.skeleton())
    exact = torch.equal(q(ref.example), reloaded(ref.example))
    tiles, weights = tile_stats(reloaded, first_last(ref.model))
    if val is None:
        top1 = ref.evaluate(reloaded)
    else:
        with torch.no_grad():
            top1 = 100.0 * (reloaded(val[0]).argmax(1) == val[1]).float().mean().item()
    return {"top1": top1, "bytes": artifact_bytes(path), "s": seconds,
            "exact": exact, "tiles": tiles, "zero_w": weights, "path": str(path)}  # fmt: skip


def deploy_times(ref, paths: dict[str, str]) -> dict[str, float]:
    """Median ms per call of each artifact deployed on oneDNN int8, side by side."""
    from compactnn.measure.timing import model_call, time_blocks

    calls = {}
    for label, path in paths.items():
        q = compactnn.load(path, model=ref.skeleton())
        deployed = compactnn.deploy(q, backend="onednn", example=ref.example)
        calls[label] = model_call(deployed, ref.example)
    timings = time_blocks(calls, warmup=3, runs=30, threads=1, pause_s=0.1)
    return {k: 1000 * t.median_s for k, t in timings.items()}


def summary(values: list[float]) -> str:
    """``mean ± spread`` (sample standard deviation; one value: the value)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def run_net(
    net: str, sparsities, seeds, epochs, log: Path | None = None, only: tuple[str, ...] = ()
) -> tuple[list[dict], str]:
    """Every arm (or those named in ``only``) on ``net`` for every seed; rows plus the
    deploy-timing line (joint at the top sparsity against ternary alone, when both ran)."""
    ref, split = reference(net)
    float_top1 = ref.evaluate(ref.model)
    rows, keep = [], {}
    with tempfile.TemporaryDirectory(prefix="compactnn-pewise-") as tmp:
        for arm, sp, recipe in arms(ref.model, sparsities):
            if only and arm not in only:
                continue
            runs = []
            for seed in seeds:
                r = train_score(ref, split, recipe, seed, epochs, Path(tmp))
                runs.append(r)
                line = {"net": net, "arm": arm, "sparsity": sp, "seed": seed, **r}
                print(json.dumps(line), file=sys.stderr, flush=True)
                if log is not None:
                    with log.open("a") as f:
                        f.write(json.dumps(line) + "\n")
            keep[(arm, sp)] = runs[0]["path"]
            rows.append({"net": net, "arm": arm, "sparsity": sp, "float": float_top1,
                         "runs": runs, "recipe": recipe.name})  # fmt: skip
        top = f"{round(100 * max(sparsities))}%"
        pair = {"joint " + top: ("joint", top), "ternary alone": ("ternary alone", "0%")}
        paths = {k: keep[v] for k, v in pair.items() if v in keep}
        ms = deploy_times(ref, paths) if len(paths) == 2 else {}
    timing = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()) or "not run"
    return rows, f"{net}, oneDNN int8, batch {ref.example.shape[0]}, 1 thread: {timing}"


def table(rows: list[dict]) -> str:
    """Markdown: net, arm, tiles pruned, top-1, vs float, bytes, zero tiles, exact, seconds."""
    out = [
        "| net | arm | PE tiles pruned | top-1 % | vs float | artifact bytes | zero tiles "
        "(pruned layers) | weights in zero tiles | reload exact | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = r["runs"]
        top = [x["top1"] for x in runs]
        nbytes = statistics.mean(x["bytes"] for x in runs)
        out.append(
            f"| {r['net']} | {r['arm']} (`{r['recipe']}`) | {r['sparsity']} | {summary(top)} "
            f"| {statistics.mean(top) - r['float']:+.1f} | {nbytes:,.0f} "
            f"| {100 * statistics.mean(x['tiles'] for x in runs):.1f}% "
            f"| {100 * statistics.mean(x['zero_w'] for x in runs):.1f}% "
            f"| {'yes' if all(x['exact'] for x in runs) else '**no**'} "
            f"| {statistics.mean(x['s'] for x in runs):.0f} |"
        )
    return "\n".join(out) + "\n"


LEVERS = (
    ("joint (default)", {}),
    ("joint, ramp 1/2", {"ramp_share": 1 / 2}),
    ("joint, ramp 2/3", {"ramp_share": 2 / 3}),
    ("joint, ramp 5/6", {"ramp_share": 5 / 6}),
    ("joint, last epoch with delta frozen", {"freeze_epochs": 1}),
    ("joint, delta / alpha over the final kept tiles", {"final_stats": True}),
    ("joint, WPC lambda 1e-3", {"wpc": 1e-3}),
    ("joint, distillation 1.0", {"distill": 1.0}),
    ("joint, threshold ratio 0.6", {"ratio": 0.6}),
    ("sequential (default)", {"schedule": "sequential"}),
    ("sequential, last epoch with delta frozen", {"schedule": "sequential", "freeze_epochs": 1}),
    ("sequential, distillation 1.0", {"schedule": "sequential", "distill": 1.0}),
)


def levers(
    seeds=(0, 1, 2), sparsity: float = 0.5, net: str = "mnist-cnn", val: float | None = 0.15
) -> str:
    """Markdown: the arms' options against both defaults on ``net`` at ``sparsity``, scored on
    a validation split (the last ``val`` of the training examples; the model trains on the
    rest) so that settings are chosen without the test split; ``val=None``: held-out split."""
    from compactnn.measure.timing import set_threads

    set_threads(1)
    ref, split = reference(net)
    where = "held-out split" if val is None else f"validation: last {val:.0%} of train"
    train_on, held = (split, None) if val is None else validation_split(split, val)
    out = [f"| {net}, {round(100 * sparsity)}% tiles | top-1 % ({where}; seeds {list(seeds)}) |",
           "|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="compactnn-pewise-") as tmp:
        for label, kw in LEVERS:
            cfg = PEWiseConfig(group=GROUP, sparsity=sparsity, **kw)
            recipe = Recipe(f"pe-{len(out)}", (Step("pe", cfg),))
            top = [
                train_score(ref, train_on, recipe, s, None, Path(tmp), held)["top1"] for s in seeds
            ]
            out.append(f"| {label} | {summary(top)} |")
    return "\n".join(out) + "\n"


def run(quick: bool = False, log: str | None = None, pair: bool = False) -> str:
    """The section: joint vs sequential at equal tile sparsity, with both references.

    ``pair``: only the target's comparison (joint and sequential, mnist-cnn, 50% and 75%,
    three seeds), no reference arms and no timing.
    """
    from compactnn.measure.timing import load_average, set_threads

    threads = set_threads(1)
    seeds = [0] if quick else [0, 1, 2]
    nets = ["mnist-cnn"] if quick or pair else ["mnist-cnn", "digits-resnet"]
    sparsities = (0.5,) if quick else (0.5, 0.75)
    epochs = 2 if quick else None
    only = ("joint", "sequential") if pair else ()
    rows, timings = [], []
    for net in nets:
        logp = Path(log) if log else None
        net_rows, timing = run_net(net, sparsities, seeds, epochs, logp, only)
        rows += net_rows
        timings.append(timing)
    load = load_average()
    note = f"Quick run: {len(seeds)} seed, {epochs} epochs. " if quick else ""
    return (
        "## PE-wise structured pruning with ternarization\n\n"
        f"{note}Seeds {seeds}; torch {threads} thread; load average "
        f"{'n/a' if load is None else f'{load:.1f}'} when the section ended (accuracy does not "
        f"depend on load, seconds do). PE tile {GROUP} (output x input channels, whole "
        "kernel window); first and last layers at 8 bits, not pruned. Command: "
        f"`{COMMAND}`.\n\n"
        + table(rows)
        + "\nDeployed CPU latency (median per call): "
        + "; ".join(timings)
        + ".\n"
    )


if __name__ == "__main__":
    if "--levers" in sys.argv[1:]:
        print(levers(sparsity=0.75 if "--75" in sys.argv[1:] else 0.5))
    else:
        print(run(quick="--quick" in sys.argv[1:], pair="--pair" in sys.argv[1:]))
