"""Benchmark: FFN, fixed-point factorized networks (issue 18), on digits-resnet.

Post-training, weight-only, on the trained ``digits-resnet`` reference (first and last layers
at 8 bits, the project's convention, in every row). FFN variants, each measured:

* the factorization alone (``refit=False``) and with the label-free refit of ``d`` on the
  layer's outputs (last session's method: ranks per layer, no error propagation);
* (a) codes refit too (coordinate descent on the output error, ``sweeps``);
* (c) each layer fit on the already-factorized layers' outputs to the float model's outputs
  (``propagate``, GPTQ-style);
* (b) ranks from one whole-model byte budget (``allocation="model"``, the default);
* the equal-bytes row: the largest budget whose artifact is no larger than ``w2``'s;
* (d) a separate fine-tuning row: label-free distillation of ``d`` and biases.

Each row is saved, loaded back (outputs checked ``torch.equal``) and scored on the 364
held-out digits; bytes are ``model.safetensors`` on disk; bits per weight count every stored
tensor (codes, scales, zero points) of the low-bit layers over the float weights they replace.
A last table deploys ``w2a8-ffn`` (``compactnn.deploy``, oneDNN) and counts its int8 convs.

Deterministic (post-training; the distillation row is seeded). Run:
``python -m compactnn.bench.ffn`` (``--quick``: no code-refit, distillation or w3 rows).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import compactnn
import compactnn.quant.ffn  # registers "ffn" (until methods.py imports it)
from compactnn.core.qlayers import is_quant_layer
from compactnn.export.artifact import parse_tensors, read_artifact
from compactnn.export.size import stored_units
from compactnn.quant.ffn import EXTRA_KEY, FFNConfig
from compactnn.quant.twn import TWNConfig
from compactnn.recipe import Recipe, Step

COMMAND = "python -m compactnn.bench.ffn"
THREADS = 1
EQUAL_BYTES_BUDGETS = (1.9, 1.8, 1.7, 1.65, 1.6, 1.5, 1.4)


def _ffn(label: str, **kwargs) -> Recipe:
    return Recipe(label, (Step("ffn", FFNConfig(**kwargs)),))


def _recipes(quick: bool) -> list[tuple[str, object]]:
    old = {"allocation": "layer", "propagate": False}
    rows: list[tuple[str, object]] = [
        ("w2 RTN", "w2"),
        ("w2 TWN, post-training", Recipe("twn", (Step("twn", TWNConfig(act=None)),))),
        ("w2-ffn, no refit (per-layer ranks)", _ffn("f0", refit=False, **old)),
        ("w2-ffn, refit d (per-layer ranks; last session)", _ffn("f1", **old)),
    ]
    if not quick:
        rows.append(("(a) + codes refit, 4 sweeps", _ffn("fa", sweeps=4, **old)))
    rows += [
        ("(c) refit d, propagated (per-layer ranks)", _ffn("fc", allocation="layer")),
        ("(b)+(c) `w2-ffn`: whole-model ranks, propagated", "w2-ffn"),
    ]
    if not quick:
        rows += [
            ("(b)+(c) + codes refit, 1 sweep", _ffn("fbc1", sweeps=1)),
            ("w3 RTN", "w3"),
            ("`w3-ffn`", "w3-ffn"),
        ]
    return rows


def stored_bits_per_weight(q: nn.Module, path: Path) -> float:
    """Bits the saved artifact stores per weight of its low-bit layers (8-bit layers left out).

    Counts with the library's reader (:func:`compactnn.export.size.stored_units`): an FFN
    layer is both of its factors over the original layer's weights.
    """
    header, blobs = read_artifact(path)
    units = stored_units(header, parse_tensors(blobs["tensors"], path))
    ranks = q._compactnn.get("extra", {}).get(EXTRA_KEY, {})

    def low_bit(name: str) -> bool:
        return name in ranks or q.get_submodule(name).weight_spec.bits < 8

    kept = [units[n] for n in units if low_bit(n)]
    return 8 * sum(b for _, b in kept) / max(sum(n for n, _ in kept), 1)


def _row(ref, label: str, recipe, tmp: Path) -> dict:
    start = time.perf_counter()
    q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    seconds = time.perf_counter() - start
    path = tmp / f"r{len(list(tmp.iterdir()))}"
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    with torch.no_grad():
        exact = torch.equal(q(ref.example), loaded(ref.example))
    ranks = q._compactnn.get("extra", {}).get(EXTRA_KEY, {})
    row = {
        "label": label,
        "top1": ref.evaluate(loaded),
        "bytes": os.path.getsize(path / "model.safetensors"),
        "bpw": stored_bits_per_weight(q, path),
        "exact": exact,
        "ranks": "/".join(str(r) for r in ranks.values()) or "-",
        "seconds": seconds,
    }
    print(f"[ffn] {row}", file=sys.stderr, flush=True)
    return row


def _equal_bytes(ref, limit: int, tmp: Path, **kwargs) -> dict | None:
    """The first budget of :data:`EQUAL_BYTES_BUDGETS` whose artifact fits ``limit`` bytes."""
    for budget in EQUAL_BYTES_BUDGETS:
        label = f"budget {budget}"
        row = _row(ref, label, _ffn(f"fb{budget}", budget=budget, **kwargs), tmp)
        if row["bytes"] <= limit:
            return row | {"budget": budget}
    return None


def _deploy_table(ref) -> list[str]:
    """``w2a8-ffn`` deployed on oneDNN: top-1 simulated and deployed, int8 convs, float."""
    q = compactnn.compress(ref.model, "w2a8-ffn", calib_data=ref.calib, progress=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        deployed = compactnn.deploy(q, backend="onednn", example=ref.example)
    ranks = q._compactnn["extra"][EXTRA_KEY]
    factors = sum(1 for n, m in q.named_modules() if is_quant_layer(m) and n[:-2] in ranks)
    kept = dict(deployed.kept_float)
    return [
        "\n`w2a8-ffn` deployed (`compactnn.deploy(q, backend='onednn')`):\n",
        "| simulated top-1 | deployed top-1 | factorized layers | quantized factor layers "
        "| max diff (output steps) | kept in float |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {ref.evaluate(q):.2f} | {ref.evaluate(deployed):.2f} | {len(ranks)} | {factors} "
        f"| {float(deployed.verification.max_diff_steps):.2f} | {kept or 'none'} |",
    ]


def run(quick: bool = False) -> str:
    """Compress, save, load and score every row; return the Markdown section."""
    from compactnn.models import load_reference

    torch.set_num_threads(THREADS)
    ref = load_reference("digits-resnet", progress=False)
    float_top1 = ref.evaluate(ref.model)
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-ffn-") as tmp:
        tmp = Path(tmp)
        rows = [_row(ref, label, recipe, tmp) for label, recipe in _recipes(quick)]
        limit = rows[0]["bytes"]  # w2 RTN
        equal = _equal_bytes(ref, limit, tmp)
        if equal is not None:
            equal["label"] = f"**FFN at <= w2 bytes** (`w2-ffn`, {equal['label']})"
            rows.insert(2, equal)
        tuned = []
        if not quick and equal is not None:
            budget = equal["budget"]
            for steps in (200, 500):
                recipe = _ffn(f"fd{steps}", budget=budget, distill_steps=steps)
                tuned.append(_row(ref, f"(d) budget {budget} + {steps} distillation steps",
                                  recipe, tmp))  # fmt: skip
    lines = [
        "## FFN: fixed-point factorized networks (digits-resnet, post-training)\n",
        f"```\n{COMMAND}{' --quick' if quick else ''}\n```\n",
        f"torch threads: {THREADS}. Weight-only, first and last layers at 8 bits in every row; "
        "calibration: the reference's 512 images; top-1 on the 364 held-out digits, scored on "
        f"the loaded artifact. Float top-1: {float_top1:.2f}. Ranks: the 8 factorized layers "
        "in execution order.\n",
        *_table(rows),
    ]
    if tuned:
        lines += [
            "\nFine-tuning (separate from the post-training method): label-free distillation "
            "of `d` and the factorized layers' biases against the float model's outputs on the "
            "calibration images (Adam, lr 1e-3, codes fixed).\n",
            *_table(tuned),
        ]
    return "\n".join([*lines, *_deploy_table(ref)]) + "\n"


def _table(rows: list[dict]) -> list[str]:
    out = [
        "| recipe | top-1 | model.safetensors bytes | bits/weight stored (low-bit layers) "
        "| ranks | load bit-exact | seconds |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['top1']:.2f} | {r['bytes']:,} | {r['bpw']:.2f} | {r['ranks']} "
            f"| {'yes' if r['exact'] else '**no**'} | {r['seconds']:.1f} |"
        )
    return out


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
