"""Benchmark: weights below one bit and beyond rounding (issue 18).

Post-training, weight-only, on the trained ``digits-resnet`` reference (first and last layers
at 8 bits, the project's convention, in every row):

* Network Sketching ``w<m>-sketch`` (m binary bases per filter, refined) and its direct
  approximation, against round-to-nearest ``w2`` / ``w3`` and post-training TWN;
* FFN ``w<B>-ffn`` (ternary factorization, rank from the bytes of ``w<B>``), with and without
  the label-free refit of ``d`` on the calibration data.

Each row is saved, loaded back (outputs checked ``torch.equal``) and scored on the 364
held-out digits; bytes are ``model.safetensors`` on disk; bits per weight count the stored
tensors (codes, scales, zero points, codebooks) of the low-bit layers over the float
weights those layers replace. A second table gives the sketch's per-layer relative
reconstruction error ``||W - W_hat||^2 / ||W||^2``, direct and refined.

Post-training rows are deterministic (one run is every seed). Run:
``python -m compactnn.bench.subbit`` (``--quick``: the m=2 / budget-2 rows only).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import compactnn
import compactnn.quant.ffn  # registers "ffn" (until methods.py imports it)
import compactnn.quant.sketch  # registers "sketch"
import compactnn.quant.subbit  # registers "subbit"
from compactnn.core.qlayers import is_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.export.artifact import pack_model
from compactnn.quant.ffn import EXTRA_KEY, FFNConfig
from compactnn.quant.sketch import SketchConfig, sketch_error, sketch_rows
from compactnn.quant.subbit import SubbitConv2d, to_subbit
from compactnn.quant.twn import TWNConfig
from compactnn.recipe import Recipe, Step

COMMAND = "python -m compactnn.bench.subbit"
THREADS = 1


def _recipes(quick: bool) -> list[tuple[str, object]]:
    two = QuantSpec(bits=2, symmetric=False, granularity="channel")
    direct = SketchConfig(weight=two, refine=False)
    rows: list[tuple[str, object]] = [
        ("w2 (RTN)", "w2"),
        ("w2-twn (post-training, weight-only)", Recipe("twn", (Step("twn", TWNConfig(act=None)),))),
        ("w2-sketch direct", Recipe("sd", (Step("sketch", direct),))),
        ("w2-sketch refined", "w2-sketch"),
        ("w2-ffn (refit)", "w2-ffn"),
        ("w2-ffn (no refit)", Recipe("fn", (Step("ffn", FFNConfig(refit=False)),))),
    ]  # fmt: skip
    if not quick:
        rows += [
            ("w3 (RTN)", "w3"),
            ("w1-sketch refined", "w1-sketch"),
            ("w3-sketch refined", "w3-sketch"),
            ("w3-ffn (refit)", "w3-ffn"),
        ]
    return rows


def stored_bits_per_weight(q: nn.Module, float_model: nn.Module) -> float:
    """Bits the low-bit layers store per float weight they replace (8-bit layers excluded)."""
    tensors, *_ = pack_model(q)
    ranks = q._compactnn.get("extra", {}).get(EXTRA_KEY, {})
    nbytes, weights, seen = 0, 0, set()
    for name, m in q.named_modules():
        if not is_quant_layer(m) or m.weight_spec.bits >= 8:
            continue
        parent = name.rpartition(".")[0]
        original = parent if parent in ranks else name
        nbytes += sum(t.nbytes for k, t in tensors.items() if k.startswith(f"{name}.weight."))
        if original not in seen:
            seen.add(original)
            weights += float_model.get_submodule(original).weight.numel()
    return 8 * nbytes / max(weights, 1)


def _row(ref, label: str, recipe, tmp: Path) -> dict:
    q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    path = tmp / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    exact = torch.equal(q(ref.example), loaded(ref.example))
    return {
        "label": label,
        "top1": ref.evaluate(loaded),
        "bytes": os.path.getsize(path / "model.safetensors"),
        "bpw": stored_bits_per_weight(q, ref.model),
        "exact": exact,
    }


def sketch_layer_errors(model: nn.Module, m: int = 2) -> list[tuple[str, float, float]]:
    """Relative reconstruction error per conv/linear layer: direct and refined sketch."""
    out = []
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            norm = float(w.pow(2).sum())
            direct = float(sketch_error(w, *sketch_rows(w, m, refine=False)).sum()) / norm
            refined = float(sketch_error(w, *sketch_rows(w, m, refine=True)).sum()) / norm
            out.append((name, direct, refined))
    return out


def _saved(model: nn.Module, ref, tmp: Path, label: str) -> tuple[float, int, bool, float]:
    """Top-1 of the loaded artifact, its bytes, bit-exactness, bits per 3x3 sub-bit weight."""
    path = tmp / label
    compactnn.save(model, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    exact = torch.equal(model(ref.example), loaded(ref.example))
    subs = [m for m in model.modules() if isinstance(m, SubbitConv2d)]
    bits = sum(8 * (m.patterns.nbytes + m.indices.nbytes + m.alpha.nbytes) for m in subs)
    weights = sum(m.shape[0] * m.shape[1] * 9 for m in subs)
    size = os.path.getsize(path / "model.safetensors")
    return ref.evaluate(loaded), size, exact, bits / max(weights, 1)


def run_training(quick: bool = False, tau: int = 6) -> str:
    """Sub-bit on mnist-cnn against binary weights trained the same way and post-hoc mapping."""
    import copy
    import statistics

    from compactnn.data.mnist import load_mnist
    from compactnn.models import load_reference

    ref = load_reference("mnist-cnn", progress=False)
    split = load_mnist()
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 1 if quick else None  # None: the recipes' defaults (6 epochs for both)
    results: dict[str, list[tuple]] = {}
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-subbit-train-") as tmp:
        for seed in seeds:
            for recipe in ("w1a8-xnor", "w1a8-subbit"):
                kw = {"epochs": epochs} if epochs else {}
                m = compactnn.train(ref.model, recipe, split, seed=seed, progress=False, **kw)
                results.setdefault(recipe, []).append(_saved(m, ref, Path(tmp), f"{recipe}{seed}"))
                sub = to_subbit(copy.deepcopy(m), tau)
                label = "post-hoc" if recipe == "w1a8-xnor" else "sub-bit"
                results.setdefault(label, []).append(_saved(sub, ref, Path(tmp), f"{label}{seed}"))
                print(f"[subbit] {recipe} seed {seed}: {results[label][-1]}", file=sys.stderr)
    names = {
        "w1a8-xnor": "w1a8-xnor (binary weights, 1 bit per weight)",
        "post-hoc": f"w1a8-xnor mapped post hoc to 2^{tau} patterns",
        "w1a8-subbit": f"w1a8-subbit trained (tau={tau}), stored as 1-bit layers",
        "sub-bit": f"w1a8-subbit tau={tau}, stored sub-bit",
    }
    lines = [
        f"\n## Sub-bit binary kernels (mnist-cnn, trained, tau={tau})\n",
        f"Seeds {list(seeds)}; epochs: {'1 (quick)' if quick else 'recipe default'}; "
        "8-bit LSQ activations in every row (1-bit activations need the binary blocks' seam); "
        "first and last layers at 8 bits; top-1 of the loaded artifact on 1,000 held-out "
        "digits (mean, min-max over seeds).\n",
        "| recipe | top-1 | min-max | model.safetensors bytes | bits per 3x3 weight | bit-exact |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, label in names.items():
        rows = results[key]
        tops = [r[0] for r in rows]
        bpw = rows[0][3]
        lines.append(
            f"| {label} | {statistics.mean(tops):.2f} | {min(tops):.1f}-{max(tops):.1f} "
            f"| {rows[0][1]:,} | {bpw if bpw else 1.0:.2f} | "
            f"{'yes' if all(r[2] for r in rows) else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    """Compress, save, load and score every row; return the Markdown section."""
    return run_post_training(quick) + run_training(quick)


def run_post_training(quick: bool = False) -> str:
    """The digits-resnet post-training tables (sketching, FFN)."""
    from compactnn.models import load_reference

    torch.set_num_threads(THREADS)
    ref = load_reference("digits-resnet", progress=False)
    float_top1 = ref.evaluate(ref.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-subbit-") as tmp:
        for label, recipe in _recipes(quick):
            rows.append(_row(ref, label, recipe, Path(tmp)))
            print(f"[subbit] {rows[-1]}", file=sys.stderr, flush=True)
    lines = [
        "## Below one bit and beyond rounding (digits-resnet, post-training)\n",
        f"```\n{COMMAND}{' --quick' if quick else ''}\n```\n",
        f"torch threads: {THREADS}. Weight-only, first and last layers at 8 bits in every row; "
        f"calibration: the reference's batches; top-1 on the 364 held-out digits, scored on "
        f"the loaded artifact. Float top-1: {float_top1:.2f}. Deterministic (post-training).\n",
        "| recipe | top-1 | model.safetensors bytes | bits/weight stored (low-bit layers) "
        "| load bit-exact |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['top1']:.2f} | {r['bytes']:,} | {r['bpw']:.2f} "
            f"| {'yes' if r['exact'] else '**no**'} |"
        )
    errors = sketch_layer_errors(ref.model)
    lines += [
        "\nSketch m=2, relative reconstruction error per layer (float weights, BN unfolded):\n",
        "| layer | direct | refined |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {d:.4f} | {f:.4f} |" for n, d, f in errors]
    ok = all(f <= d for _, d, f in errors)
    lines.append(f"\nRefined <= direct on every layer: {'yes' if ok else '**no**'}.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
