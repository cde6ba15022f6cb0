"""Benchmark: Sub-bit Neural Networks on mnist-cnn, trained (issue 18).

Rows, each trained with the binary recipes' schedule (8-bit LSQ activations, first and last
layers at 8 bits, the recipes' default 6 epochs):

* ``w1a8-xnor``: binary weights, 1 bit per weight (the like-for-like 1-bit recipe);
* the same trained binary model mapped post hoc to its ``2^tau`` most frequent patterns per
  layer (:func:`compactnn.quant.subbit.to_subbit`): the paper's baseline;
* ``w1a8-subbit`` trained with ``tau``, stored sub-bit (``to_subbit`` is exact on it).

Each model is saved, loaded back (outputs checked ``torch.equal``) and scored on the 1,000
held-out digits; bytes are ``model.safetensors`` on disk; bits per 3x3 weight count what the
sub-bit layers store (patterns, indices, float16 alpha) over their weights. Mean, standard
deviation (sample, n - 1) and min-max over the seeds.

Run: ``python -m compactnn.bench.subbit`` (3 seeds, tau 6; ``--taus 4,6,8``; ``--quick``: one
seed, one epoch; ``--log FILE``: append each result as a JSON line, and skip runs already in
it, so an interrupted run resumes).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import compactnn
import compactnn.quant.subbit  # registers "subbit" (until methods.py imports it)
from compactnn.quant.subbit import SubbitConfig, SubbitConv2d, to_subbit
from compactnn.recipe import Recipe, Step

COMMAND = "python -m compactnn.bench.subbit"
THREADS = 1


def subbit_bits_per_weight(model: nn.Module) -> float:
    """Bits the sub-bit layers store (patterns, indices, alpha) per 3x3 weight (0: none)."""
    subs = [m for m in model.modules() if isinstance(m, SubbitConv2d)]
    bits = sum(8 * (m.patterns.nbytes + m.indices.nbytes + m.alpha.nbytes) for m in subs)
    weights = sum(m.shape[0] * m.shape[1] * 9 for m in subs)
    return bits / weights if weights else 0.0


def _saved(model: nn.Module, ref, tmp: Path, label: str) -> dict:
    """Top-1 of the loaded artifact, its bytes, bit-exactness, bits per 3x3 weight."""
    path = tmp / label
    compactnn.save(model, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    with torch.no_grad():
        exact = torch.equal(model(ref.example), loaded(ref.example))
    return {
        "top1": ref.evaluate(loaded),
        "bytes": os.path.getsize(path / "model.safetensors"),
        "exact": exact,
        "bpw": subbit_bits_per_weight(model) or 1.0,
    }


def _subbit_recipe(tau: int) -> Recipe | str:
    if tau == 6:
        return "w1a8-subbit"
    return Recipe(f"w1a8-subbit-tau{tau}", (Step("subbit", SubbitConfig(tau=tau)),))


def _read_log(log: Path | None) -> list[dict]:
    if log is None or not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _record(results: list[dict], log: Path | None, entry: dict) -> None:
    results.append(entry)
    print(f"[subbit] {entry}", file=sys.stderr, flush=True)
    if log is not None:
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def train_rows(
    seeds: tuple[int, ...], taus: tuple[int, ...], epochs: int | None, log: Path | None = None
) -> list[dict]:
    """Train and score every row; one dict per (row kind, tau, seed)."""
    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    torch.set_num_threads(THREADS)
    ref = load_reference("mnist-cnn", progress=False)
    split = load_mnist()
    results = _read_log(log)
    done = {(r["kind"], r["tau"], r["seed"]) for r in results}
    kw = {"epochs": epochs} if epochs else {}
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-subbit-") as tmp:
        tmp = Path(tmp)
        for tau in taus:  # the first tau for every seed, then the others
            for seed in seeds:
                missing = [t for t in taus if ("post-hoc", t, seed) not in done]
                if ("xnor", 0, seed) not in done or missing:
                    m = compactnn.train(
                        ref.model, "w1a8-xnor", split, seed=seed, progress=False, **kw
                    )
                    if ("xnor", 0, seed) not in done:
                        entry = {"kind": "xnor", "tau": 0, "seed": seed}
                        _record(results, log, entry | _saved(m, ref, tmp, f"x{seed}"))
                    for t in missing:  # post-hoc mapping of the same binary model
                        sub = to_subbit(copy.deepcopy(m), t)
                        entry = {"kind": "post-hoc", "tau": t, "seed": seed}
                        _record(results, log, entry | _saved(sub, ref, tmp, f"p{t}-{seed}"))
                if ("sub-bit", tau, seed) not in done:
                    recipe = _subbit_recipe(tau)
                    m = compactnn.train(ref.model, recipe, split, seed=seed, progress=False, **kw)
                    sub = to_subbit(m, tau)
                    entry = {"kind": "sub-bit", "tau": tau, "seed": seed}
                    _record(results, log, entry | _saved(sub, ref, tmp, f"s{tau}-{seed}"))
                done = {(r["kind"], r["tau"], r["seed"]) for r in results}
    return results


def _stats(tops: list[float]) -> str:
    mean = statistics.mean(tops)
    std = statistics.stdev(tops) if len(tops) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f} | {min(tops):.1f}-{max(tops):.1f}"


def table(results: list[dict], epochs: int | None) -> str:
    """The Markdown table of :func:`train_rows`' results (one row per kind and tau)."""
    others = {(r["kind"], r["tau"]) for r in results if r["kind"] != "xnor"}
    keys = [("xnor", 0), *sorted(others, key=lambda k: (k[1], k[0] != "post-hoc"))]
    names = {
        "xnor": lambda t: "w1a8-xnor (binary weights)",
        "post-hoc": lambda t: f"w1a8-xnor mapped post hoc to 2^{t} patterns",
        "sub-bit": lambda t: f"w1a8-subbit tau={t}, stored sub-bit",
    }
    seeds = sorted({r["seed"] for r in results})
    lines = [
        "## Sub-bit binary kernels (mnist-cnn, trained)\n",
        f"```\n{COMMAND}\n```\n",
        f"torch threads: {THREADS}; seeds {seeds}; epochs: "
        f"{epochs if epochs else 'recipe default (6)'}; 8-bit LSQ activations in every row "
        "(1-bit activations need the binary blocks' seam); first and last layers at 8 bits; "
        "top-1 of the loaded artifact on 1,000 held-out digits, mean ± std (n - 1) and "
        "min-max over seeds.\n",
        "| recipe | top-1 | min-max | seeds | model.safetensors bytes | bits per 3x3 weight "
        "| load bit-exact |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, tau in keys:
        rows = [r for r in results if r["kind"] == kind and r["tau"] == tau]
        if not rows:
            continue
        exact = "yes" if all(r["exact"] for r in rows) else "**no**"
        lines.append(
            f"| {names[kind](tau)} | {_stats([r['top1'] for r in rows])} | {len(rows)} "
            f"| {rows[0]['bytes']:,} | {rows[0]['bpw']:.2f} | {exact} |"
        )
    return "\n".join(lines) + "\n"


def run(quick: bool = False, taus: tuple[int, ...] = (6,), log: Path | None = None) -> str:
    """Train, save, load and score every row; return the Markdown section."""
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 1 if quick else None
    return table(train_rows(seeds, taus, epochs, log), epochs)


def _arg(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


if __name__ == "__main__":
    taus = tuple(int(t) for t in (_arg("--taus") or "6").split(","))
    log = _arg("--log")
    print(run(quick="--quick" in sys.argv, taus=taus, log=Path(log) if log else None))
