"""Benchmark section ``lowbit_train``: the founding literature's low-bit training methods
(issue 19) beside their baselines, on ``mnist-cnn``, ``digits-resnet`` and a narrower CNN
(three convolutions, 16-32-64 channels).

Every arm is ``compactnn.train`` from the same float model, scored on the held-out split
after saving and loading the artifact back. ``run(quick=True)``: one seed, mnist-cnn and the
narrow net, fewer epochs; ``run()``: three seeds (mean and spread), all three nets.

Regenerate with ``python -m compactnn.bench --only lowbit_train``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import compactnn
from compactnn.measure.size import artifact_bytes
from compactnn.recipe import Recipe, Step, resolve_recipe

COMMAND = "python -m compactnn.bench --only lowbit_train"
NARROW = "narrow-cnn"


class NarrowCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks of 16, 32, 64 channels (strides 1, 2, 2), pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers, c_in = [], 1
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))  # (N, 10)


def narrow_reference(progress: bool = False):
    """The narrow CNN trained on the 4,000 embedded MNIST digits (cached like the refs)."""
    from compactnn.data import mnist
    from compactnn.models import image
    from compactnn.models.fit import FitConfig

    return image.image_reference(
        NARROW, NarrowCNN, mnist.load_mnist(), [sys.modules[__name__], mnist],
        seed=0, cfg=FitConfig(epochs=4), progress=progress,
    )  # fmt: skip


def reference(name: str):
    """``(Reference, training split)`` of ``name``."""
    from compactnn.data.digits import load_digits8
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    if name == NARROW:
        return narrow_reference(), load_mnist()
    split = load_digits8() if name == "digits-resnet" else load_mnist()
    return load_reference(name, progress=False), split


def val_split(split, frac: float = 0.15):
    """``split`` with its last ``frac`` of the training examples as the held-out part (the
    test examples are dropped): for choosing settings without looking at the test split.

    The reference model was trained on all the training examples, so validation scores
    are optimistic in absolute terms; they only rank the arms.
    """
    n = split.x_train.shape[0]
    cut = n - max(1, round(frac * n))
    return replace(
        split, x_train=split.x_train[:cut], y_train=split.y_train[:cut],
        x_test=split.x_train[cut:], y_test=split.y_train[cut:],
    )  # fmt: skip


def with_options(short: str, label: str, **options) -> Recipe:
    """The recipe ``short`` with its training config's fields replaced by ``options``."""
    base = resolve_recipe(short)
    steps = tuple(
        Step(s.method, replace(s.config, **options), s.targets) if i == 0 else s
        for i, s in enumerate(base.steps)
    )
    return Recipe(label, steps)


def irnet_arms(levers: bool = False) -> list[tuple[str, Callable[[], Recipe | str]]]:
    """XNOR alone (its defaults) and with IR-Net's Libra-PB, EDE, both (each at the options'
    own defaults, ``irnet_lr`` included), both at XNOR's learning rate, and both with the
    paper's first ``t`` (0.1): the mnist-cnn target's arms (EDE on the weights only, the
    default). ``levers``: also each lever tried in session 9 (EDE on weights and
    activations as the paper, or on activations only; a per-step ``t``; the paper's ``t``
    per step; weight decay on the latent weights)."""
    both = {"libra_pb": True, "ede": True}

    def opt(label: str, **options) -> Callable[[], Recipe]:
        return lambda: with_options("w1a1-xnor", label, **options)

    arms = [
        ("w1a1-xnor", lambda: "w1a1-xnor"),
        ("xnor + Libra-PB", opt("xnor-libra", libra_pb=True)),
        ("xnor + EDE", opt("xnor-ede", ede=True)),
        ("xnor + IR-Net (both)", opt("xnor-irnet", **both)),
        ("xnor + IR-Net (both), XNOR's lr 5e-3", opt("xnor-irnet-lr", **both, irnet_lr=None)),
        ("xnor + IR-Net, paper's t from 0.1", opt("xnor-irnet-paper", **both, ede_t_min=0.1)),
    ]
    if levers:
        paper = {**both, "ede_on": "both"}  # EDE on weights and activations, as the paper
        arms += [
            ("xnor + IR-Net, EDE on weights and activations", opt("xnor-irnet-wa", **paper)),
            ("xnor + IR-Net, EDE on activations only", opt("xnor-irnet-a", **both, ede_on="acts")),
            (
                "xnor + IR-Net, EDE on both, t per step",
                opt("xnor-irnet-s", **paper, ede_per_step=True),
            ),
            (
                "xnor + IR-Net, EDE on both, paper's t 0.1 to 10 per step",
                opt("xnor-irnet-sp", **paper, ede_per_step=True, ede_t_min=0.1),
            ),
            ("xnor + IR-Net, t per step", opt("xnor-irnet-ws", **both, ede_per_step=True)),
            ("xnor + IR-Net, weight decay 1e-2", opt("xnor-irnet-wd", **both, irnet_wd=1e-2)),
        ]
    return arms


def irnet_length_arms(steps: int = 1200) -> list[tuple[str, Callable[[], Recipe | str]]]:
    """Session 23's levers: XNOR alone and with IR-Net's two options (their defaults), both
    trained for at least ``steps`` optimizer steps (``min_steps``; the same length for both
    arms), and the options with their own learning rate at 1e-3 or 3e-3 (``irnet_lr``) at
    the recipe's length."""
    both = {"libra_pb": True, "ede": True}

    def opt(label: str, **options) -> Callable[[], Recipe]:
        return lambda: with_options("w1a1-xnor", label, **options)

    return [
        (f"w1a1-xnor, {steps} steps", opt(f"xnor-{steps}", min_steps=steps)),
        (f"xnor + IR-Net (both), {steps} steps",
         opt(f"xnor-irnet-{steps}", **both, min_steps=steps)),
        ("xnor + IR-Net, irnet_lr 1e-3", opt("xnor-irnet-lr1", **both, irnet_lr=1e-3)),
        ("xnor + IR-Net, irnet_lr 3e-3", opt("xnor-irnet-lr3", **both, irnet_lr=3e-3)),
    ]  # fmt: skip


def binary_arms(ablation: bool = False) -> list[tuple[str, Callable[[], Recipe | str]]]:
    """Every binary recipe alone and with IR-Net's two options (the cross-architecture
    table); ``ablation``: also each recipe without the batch-norm re-estimation, and with
    the previous defaults (lr 1e-3, the recipe's epochs whatever the steps, no
    re-estimation)."""
    arms: list[tuple[str, Callable[[], Recipe | str]]] = []
    old = {"lr": 1e-3, "min_steps": 0, "recalibrate_batches": 0}
    for kind in ("xnor", "bireal", "reactnet"):
        short = f"w1a1-{kind}"
        arms.append((short, lambda s=short: s))
        arms.append(
            (
                f"{kind} + IR-Net (both)",
                lambda s=short, k=kind: with_options(s, f"{k}-irnet", libra_pb=True, ede=True),
            )
        )
        if ablation:
            arms.append(
                (f"{kind}, no BN re-estimation", lambda s=short, k=kind: with_options(
                    s, f"{k}-norecal", recalibrate_batches=0))
            )  # fmt: skip
            arms.append(
                (f"{kind}, previous defaults", lambda s=short, k=kind: with_options(
                    s, f"{k}-old", **old))
            )  # fmt: skip
    return arms


def tsq_arms() -> list[tuple[str, Callable[[], Recipe | str]]]:
    """TSQ (ternary weights, 2-bit activations) beside plain ternarisation and LSQ."""
    return [
        ("w2a2-lsq", lambda: "w2a2-lsq"),
        ("w2a2-tsq", lambda: "w2a2-tsq"),
        (
            "tsq, plain ternarisation (no least squares)",
            lambda: with_options("w2a2-tsq", "tsq-plain", least_squares=False),
        ),
    ]


def train_score(
    ref, split, recipe, seed: int, epochs: int | None, tmp: Path, val: bool = False
) -> dict:
    """Train, save, load back, score: top-1 of the reloaded artifact, bytes, seconds.
    ``val``: train on ``val_split(split)`` and score on its validation part instead."""
    if val:
        split = val_split(split)
    t0 = time.perf_counter()
    q = compactnn.train(ref.model, recipe, split, epochs=epochs, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    path = tmp / f"a{seed}"
    compactnn.save(q, path)
    reloaded = compactnn.load(path, model=ref.skeleton())
    x = ref.example
    exact = torch.equal(q(x), reloaded(x))
    if val:
        from compactnn.training.loop import evaluate_top1

        top1 = evaluate_top1(reloaded, split.x_test, split.y_test)
    else:
        top1 = ref.evaluate(reloaded)
    return {"top1": top1, "bytes": artifact_bytes(path), "s": seconds,
            "exact": exact}  # fmt: skip


def summary(values: list[float]) -> str:
    """``mean ± spread`` (spread: sample standard deviation; one value: the value)."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def run_arms(nets, arms, seeds, epochs, tag: str, val: bool = False) -> list[dict]:
    """Every arm on every net for every seed; one row per (net, arm); ``val``: trained and
    scored on :func:`val_split` of the training split (choosing settings)."""
    rows = []
    for net in nets:
        ref, split = reference(net)
        float_top1 = ref.evaluate(ref.model)
        for label, make in arms:
            runs = []
            with tempfile.TemporaryDirectory(prefix="compactnn-lowbit-") as tmp:
                for seed in seeds:
                    runs.append(train_score(ref, split, make(), seed, epochs, Path(tmp), val))
            row = {"net": net, "arm": label, "float": float_top1, "runs": runs}
            rows.append(row)
            top = [r["top1"] for r in runs]
            print(f"[{tag}] {net} {label}: {top}", file=sys.stderr, flush=True)
    return rows


def arms_table(rows: list[dict]) -> str:
    """Markdown: net, arm, float, top-1 (mean ± spread), gap, bytes, exact reload, seconds."""
    out = [
        "| net | arm | float top-1 % | top-1 % | vs float | artifact | reload exact | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top = [x["top1"] for x in r["runs"]]
        gap = statistics.mean(top) - r["float"]
        exact = "yes" if all(x["exact"] for x in r["runs"]) else "**no**"
        secs = statistics.mean(x["s"] for x in r["runs"])
        kib = r["runs"][0]["bytes"] / 1024
        out.append(
            f"| {r['net']} | {r['arm']} | {r['float']:.1f} | {summary(top)} | {gap:+.1f} "
            f"| {kib:.1f} KiB | {exact} | {secs:.0f} |"
        )
    return "\n".join(out) + "\n"


def within(rows: list[dict], points: float = 5.0) -> str:
    """One line per (net, recipe) row named ``w1a1-*``: met / not met within ``points``."""
    out = []
    for r in rows:
        if not r["arm"].startswith("w1a1-"):
            continue
        gap = statistics.mean(x["top1"] for x in r["runs"]) - r["float"]
        verdict = "met" if gap >= -points else "**not met**"
        out.append(f"- {r['net']}, `{r['arm']}`: {gap:+.1f} points ({verdict})")
    return "\n".join(out) + "\n"


def run(quick: bool = False) -> str:
    """IR-Net options on XNOR (mnist-cnn), the binary recipes ± IR-Net on three nets, TSQ."""
    import compactnn.quant.tsq  # noqa: F401  (registers w2a2-tsq before methods.py lists it)
    from compactnn.measure.timing import set_threads

    threads = set_threads(1 if quick else 2)
    seeds = [0] if quick else [0, 1, 2]
    nets = [NARROW] if quick else ["mnist-cnn", "digits-resnet", NARROW]
    epochs = 2 if quick else None
    irnet = irnet_arms()
    if quick:  # the target's pair only
        irnet = [a for a in irnet if a[0] in ("w1a1-xnor", "xnor + IR-Net (both)")]
    irnet_rows = run_arms(["mnist-cnn"], irnet, seeds, epochs, "irnet")
    arms = binary_arms(ablation=not quick)
    if quick:  # the recipes alone
        arms = [a for a in arms if a[0].startswith("w1a1-")]
    rows = run_arms(nets, arms, seeds, epochs, "binary")
    tsq_nets = ["digits-resnet"] if quick else ["digits-resnet", "mnist-cnn"]
    tsq_rows = run_arms(tsq_nets, tsq_arms(), seeds, 3 if quick else None, "tsq")
    note = (
        f" **Quick run: {len(seeds)} seed, {epochs} epochs per arm; the targets are for "
        "full runs.**"
        if quick
        else ""
    )
    return (
        "## Low-bit training: IR-Net options on XNOR\n\n"
        f"```\n{COMMAND}\n```\n\n"
        f"torch threads: {threads}; seeds {seeds}; epochs: each recipe's default unless "
        "stated. Top-1 on the held-out split of each net (mnist-cnn and narrow-cnn: the "
        "1,000 test digits; digits-resnet: the sklearn digits test split), scored on the "
        "artifact after saving and loading it back. Target (issue 19): XNOR + IR-Net at "
        f"least +0.5 points over XNOR on mnist-cnn.{note}\n\n" + arms_table(irnet_rows) + "\n"
        "## Low-bit training: binary recipes ± IR-Net across nets\n\n"
        "Target (issue 19): every binary recipe within 5 points of float on mnist-cnn, "
        "digits-resnet and the narrow CNN (16-32-64 channels). Defaults: lr 3e-3, at least "
        "600 optimizer steps, the blocks' batch norms re-estimated on 100 training batches "
        "before freezing.\n\n" + arms_table(rows) + "\n" + within(rows) + "\n"
        "## Low-bit training: TSQ (ternary weights, 2-bit activations)\n\n"
        "Each recipe's default epochs (TSQ: 4 code-learning + 2 fine-tuning). Targets: the "
        "least-squares step beats plain ternarisation of the same network, and TSQ is within "
        "0.5 points of `w2a2-lsq` or above it on digits-resnet.\n\n" + arms_table(tsq_rows)
    )


def main(argv: list[str] | None = None) -> None:
    """Run a part of the section: ``python -m compactnn.bench.lowbit_train PART NET SEED
    [val]``, PART one of ``irnet``, ``irnet-levers``, ``irnet-length`` (session 23),
    ``binary``, ``tsq``; prints one JSON line per arm (for splitting the three-seed tables
    over machines or sessions). ``val``: train on the first 85 % of the training split and
    score on the last 15 % (choosing settings without the test split)."""
    import json

    import compactnn.quant.tsq  # noqa: F401
    from compactnn.measure.timing import set_threads

    args = argv if argv is not None else sys.argv[1:]
    part, net, seed = args[:3]
    val = args[3:4] == ["val"]
    set_threads(1)
    arms = {
        "irnet": irnet_arms, "irnet-levers": lambda: irnet_arms(levers=True),
        "irnet-length": irnet_length_arms,
        "binary": lambda: binary_arms(True), "tsq": tsq_arms,
    }[part]()  # fmt: skip
    for row in run_arms([net], arms, [int(seed)], None, part, val=val):
        res = row["runs"][0]
        print(json.dumps({"net": net, "arm": row["arm"], "seed": int(seed), "val": val,
                          "float": row["float"], **res}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
