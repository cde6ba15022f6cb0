"""Benchmark section ``lowbit_train2``: ELQ and sparsity-inducing BNNs (issue 19) beside
their baselines on ``mnist-cnn``.

* ELQ binary and ternary weights with 8-bit activations (``w1a8-elq``, ``w2a8-elq``, and the
  paper's incremental schedule as an option) against ``w1a8-xnor`` and ``w2a8-twn``;
  ``w1a8-elq`` trains with the binary recipes' budget, loss term only
  (``quant.elq.BINARY_TRAINING``); two arms show it with the approximation-error term and
  with the ternary recipe's training instead (its defaults before issue 19's fix).
* The sparsity-inducing BNN's four arms (``+-1`` or ``{0, 1}`` forward; clipped STE or the
  trainable backward) on ``w1a1-sibnn``, with the activation sparsity reached (share of
  zeros among the binary activations of the test digits).

Every arm is ``compactnn.train`` from the same float model, scored on the held-out split
after saving and loading the artifact back (helpers of :mod:`compactnn.bench.lowbit_train`).
``run(quick=True)``: one seed, 2 epochs per arm; ``run()``: three seeds, each recipe's
default epochs. ELQ's binary options are chosen on a validation split carved from the
training digits (:func:`validation_split`, :func:`elq_val_arms`; ``python -m
compactnn.bench.lowbit_train2 elq-val SEED``), never on the held-out digits.

Regenerate with ``python -m compactnn.bench --only lowbit_train2``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import compactnn
from compactnn.bench.lowbit_train import (
    arms_table,
    reference,
    summary,
    train_score,
    with_options,
)
from compactnn.recipe import Recipe

COMMAND = "python -m compactnn.bench --only lowbit_train2"


def elq_arms() -> list[tuple[str, Callable[[], Recipe | str]]]:
    """ELQ at 1 and 2 bits (plain and incremental) beside XNOR / TWN weight-only training."""
    inc = (0.5, 0.75, 0.875)
    return [
        ("w1a8-xnor", lambda: "w1a8-xnor"),
        ("w1a8-elq", lambda: "w1a8-elq"),
        ("w1a8-elq, with the approximation-error term (approx 1)",
         lambda: with_options("w1a8-elq", "e1a", approx=1.0)),
        ("w1a8-elq, ternary training (4 epochs, lr 1e-3, distill 0.5, approx 0)",
         lambda: with_options("w1a8-elq", "e1t", epochs=4, min_steps=0, lr=1e-3, lr_quant=1e-3,
                              distill=0.5, approx=0.0)),
        ("w1a8-elq, no gradient through the scale",
         lambda: with_options("w1a8-elq", "e1s", scale_grad=False)),
        ("w1a8-elq, per-layer scale", lambda: with_options("w1a8-elq", "e1l", per_channel=False)),
        ("w1a8-elq, incremental 0.5/0.75/0.875",
         lambda: with_options("w1a8-elq", "e1i", portions=inc)),
        ("w1a8-elq, incremental 0.5/0.75/0.875/1, straight-through stages",
         lambda: with_options("w1a8-elq", "e1r", portions=(*inc, 1.0), frozen_codes=False)),
        ("w2a8-twn (per-layer scale)", lambda: "w2a8-twn"),
        ("w2a8-elq", lambda: "w2a8-elq"),
        ("w2a8-elq, no gradient through the scale",
         lambda: with_options("w2a8-elq", "e2s", scale_grad=False)),
        ("w2a8-elq, per-layer scale", lambda: with_options("w2a8-elq", "e2l", per_channel=False)),
        ("w2a8-elq, incremental 0.5/0.75/0.875",
         lambda: with_options("w2a8-elq", "e2i", portions=inc)),
    ]  # fmt: skip


def elq_val_arms() -> list[tuple[str, Callable[[], Recipe | str]]]:
    """The binary arms compared on the validation split to choose ``w1a8-elq``'s options."""
    staged = (0.5, 0.75, 0.875, 1.0)
    return [
        ("w1a8-xnor", lambda: "w1a8-xnor"),
        ("w1a8-elq, approx 1", lambda: with_options("w1a8-elq", "v-a1", approx=1.0)),
        ("w1a8-elq, approx 0 (the default)", lambda: "w1a8-elq"),
        ("w1a8-elq, incremental 0.5/0.75/0.875/1, frozen codes",
         lambda: with_options("w1a8-elq", "v-if", portions=staged)),
        ("w1a8-elq, incremental 0.5/0.75/0.875/1, straight-through stages",
         lambda: with_options("w1a8-elq", "v-ir", portions=staged, frozen_codes=False)),
    ]  # fmt: skip


def validation_split(split, fraction: float = 0.15):
    """``split`` with its training digits cut in two: the first ``1 - fraction`` train, the
    last ``fraction`` (600 of mnist's 4,000) take the test digits' place. Options are
    chosen there; the held-out test digits are only for the final seeds."""
    n = len(split.x_train)
    cut = n - int(n * fraction)
    return dataclasses.replace(
        split, x_train=split.x_train[:cut], y_train=split.y_train[:cut],
        x_test=split.x_train[cut:], y_test=split.y_train[cut:],
    )  # fmt: skip


def run_val_arms(arms, seeds) -> list[dict]:
    """Every arm on mnist-cnn trained on the validation split's training part, top-1 on
    its validation digits (after save / load), one row per arm."""
    from compactnn.models.fit import top1

    ref, split = reference("mnist-cnn")
    val = validation_split(split)
    ref = dataclasses.replace(ref, evaluate=lambda m: top1(m, val.x_test, val.y_test))
    rows = []
    for label, make in arms:
        with tempfile.TemporaryDirectory(prefix="compactnn-elqval-") as tmp:
            runs = [train_score(ref, val, make(), seed, None, Path(tmp)) for seed in seeds]
        rows.append({"net": "mnist-cnn (validation)", "arm": label,
                     "float": ref.evaluate(ref.model), "runs": runs})  # fmt: skip
        print(f"[elq-val] {label}: {[r['top1'] for r in runs]}", file=sys.stderr, flush=True)
    return rows


def sibnn_arms() -> list[tuple[str, Callable[[], Recipe | str]]]:
    """The four arms: forward levels x backward function (all on XNOR blocks)."""
    arms = [("w1a1-xnor (reference)", lambda: "w1a1-xnor")]
    for levels in ("pm1", "01"):
        for backward in ("ste", "trainable"):
            label = f"{'+-1' if levels == 'pm1' else '{0,1}'} forward, {backward} backward"
            arms.append(  # rho: the config's default
                (
                    label,
                    lambda lv=levels, bw=backward: with_options(
                        "w1a1-sibnn", f"si-{lv}-{bw}", levels=lv, backward=bw
                    ),
                )
            )
    arms.append(
        ("{0,1} forward, trainable backward, rho 0.5",
         lambda: with_options("w1a1-sibnn", "si-01-rho05", rho=0.5)),
    )  # fmt: skip
    return arms


def run_sparsity_arms(arms, seeds, epochs) -> list[dict]:
    """Like ``run_arms`` on mnist-cnn, also recording the activation sparsity."""
    from compactnn.quant.sibnn import activation_sparsity

    ref, split = reference("mnist-cnn")
    float_top1 = ref.evaluate(ref.model)
    x = split.x_test  # the 1,000 held-out digits
    rows = []
    for label, make in arms:
        runs = []
        with tempfile.TemporaryDirectory(prefix="compactnn-sibnn-") as tmp:
            for seed in seeds:
                r = train_score(ref, split, make(), seed, epochs, Path(tmp))
                reloaded = compactnn.load(Path(tmp) / f"a{seed}", model=ref.skeleton())
                r["sparsity"] = activation_sparsity(reloaded, x)
                runs.append(r)
        rows.append({"net": "mnist-cnn", "arm": label, "float": float_top1, "runs": runs})
        print(f"[sibnn] {label}: {[r['top1'] for r in runs]}", file=sys.stderr, flush=True)
    return rows


def sparsity_table(rows: list[dict]) -> str:
    """Markdown: arm, top-1 (mean ± spread), gap to float, activation sparsity."""
    out = ["| arm | top-1 % | vs float | activation zeros % | reload exact |",
           "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        top = [x["top1"] for x in r["runs"]]
        sp = summary([100 * x["sparsity"] for x in r["runs"]])
        exact = "yes" if all(x["exact"] for x in r["runs"]) else "**no**"
        gap = statistics.mean(top) - r["float"]
        out.append(f"| {r['arm']} | {summary(top)} | {gap:+.1f} | {sp} | {exact} |")
    return "\n".join(out) + "\n"


def run(quick: bool = False) -> str:
    """The ELQ and sparsity-inducing BNN sections."""
    import compactnn.quant.elq  # registers elq (before methods.py lists it)
    import compactnn.quant.sibnn  # noqa: F401
    from compactnn.bench.lowbit_train import run_arms
    from compactnn.measure.timing import set_threads

    threads = set_threads(1 if quick else 2)
    seeds = [0] if quick else [0, 1, 2]
    epochs = 2 if quick else None
    elq_rows = run_arms(["mnist-cnn"], elq_arms(), seeds, epochs, "elq")
    si_rows = run_sparsity_arms(sibnn_arms(), seeds, epochs)
    note = f" **Quick run: {len(seeds)} seed, {epochs} epochs per arm.**" if quick else ""
    return (
        "## Low-bit training: ELQ (binary and ternary weights, 8-bit activations)\n\n"
        f"```\n{COMMAND}\n```\n\n"
        f"torch threads: {threads}; seeds {seeds}; epochs: each recipe's default unless "
        "stated. Top-1 on the 1,000 held-out test digits, scored on the artifact after "
        "saving and loading it back. Target (issue 19): ELQ at or above XNOR / TWN "
        f"weight-only training at the same bits.{note}\n\n" + arms_table(elq_rows) + "\n"
        "## Low-bit training: sparsity-inducing BNN (four arms)\n\n"
        "XNOR blocks on mnist-cnn (first and last layers at 8 bits); activation zeros: the "
        "share of binary activations at 0 ({0,1}) or -1 (+-1) over the binary layers.\n\n"
        + sparsity_table(si_rows)
    )


def close_pairs(seed: int) -> list[dict]:
    """The arms of issue 19's three comparisons within a few test digits, for one seed."""
    from compactnn.bench import pewise
    from compactnn.bench.lowbit_train import irnet_arms, run_arms

    elq = [a for a in elq_arms() if a[0] in ("w1a8-xnor", "w1a8-elq")]
    irnet = [a for a in irnet_arms() if a[0] in ("w1a1-xnor", "xnor + IR-Net (both)")]
    rows = run_arms(["mnist-cnn"], elq + irnet, [seed], None, "pairs")
    pe, _ = pewise.run_net("mnist-cnn", [0.5], [seed], None, only=("joint", "sequential"))
    return rows + [{**r, "arm": f"pe50 {r['arm']}"} for r in pe]


PARTS = ("elq", "elq-val", "sibnn", "pairs")
USAGE = (
    "usage: python -m compactnn.bench.lowbit_train2 PART SEED  (PART: "
    + ", ".join(PARTS)
    + "; SEED: an integer, e.g. `sibnn 0`)"
)


def parse_args(args: list[str]) -> tuple[str, int]:
    """``(PART, SEED)`` from the command line; anything else exits with the usage line.

    Example:
        >>> parse_args(["sibnn", "2"])
        ('sibnn', 2)
    """
    if len(args) != 2 or args[0] not in PARTS or not args[1].lstrip("-").isdigit():
        got = " ".join(args) or "no arguments"
        raise SystemExit(f"{USAGE}; got: {got}")
    return args[0], int(args[1])


def main(argv: list[str] | None = None) -> None:
    """Run a part: ``python -m compactnn.bench.lowbit_train2 PART SEED``, PART ``elq``,
    ``elq-val`` (the validation split), ``sibnn`` or ``pairs`` (issue 19's three close
    comparisons: ``w1a8-elq`` / ``w1a8-xnor``, IR-Net's options / ``w1a1-xnor``, PE-wise joint /
    sequential at 50%) (mnist-cnn, default epochs, one thread); one JSON line per arm."""
    import json

    import compactnn.quant.elq
    import compactnn.quant.sibnn  # noqa: F401
    from compactnn.bench.lowbit_train import run_arms
    from compactnn.measure.timing import set_threads

    part, seed = parse_args(argv if argv is not None else sys.argv[1:])
    set_threads(1)
    if part == "elq":
        rows = run_arms(["mnist-cnn"], elq_arms(), [int(seed)], None, "elq")
    elif part == "elq-val":
        rows = run_val_arms(elq_val_arms(), [int(seed)])
    elif part == "pairs":
        rows = close_pairs(int(seed))
    else:  # "sibnn" (parse_args refuses any other PART)
        rows = run_sparsity_arms(sibnn_arms(), [int(seed)], None)
    for row in rows:
        res = row["runs"][0]
        print(json.dumps({"net": row["net"], "arm": row["arm"], "seed": int(seed),
                          "float": row["float"], **res}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
