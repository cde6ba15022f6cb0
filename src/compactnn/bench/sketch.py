"""Benchmark: Network Sketching on digits-resnet, post-training (issue 18).

Rows: ``w<m>`` round-to-nearest and ``w<m>-sketch`` (direct and refined) for ``m = 1..4``
binary bases per filter (quick: ``m = 2`` only), weight-only, first and last layers at 8 bits
in every row. Each model is saved, loaded back (outputs checked ``torch.equal``) and the
LOADED model is scored on the held-out digits. Bytes are ``model.safetensors`` on disk; bits
per weight are what the artifact stores for the low-bit layers (codes or their sparse
encoding, scales, zero points, binary bases: :func:`compactnn.export.size.stored_units`)
over their weights; "tensor data" is the file without its JSON header. A second table
gives each sketched layer's relative reconstruction error ``||W - W_hat|| / ||W||`` (``W``:
the batch-norm-folded float weight), direct against refined.

Post-training quantization is deterministic (no seed). Run: ``python -m
compactnn.bench.sketch`` (``--quick``: m = 2 only).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import compactnn
from compactnn.core.fold import fold_batchnorm
from compactnn.core.qlayers import is_quant_layer
from compactnn.export.artifact import parse_tensors, read_artifact
from compactnn.export.size import stored_units
from compactnn.quant.base import short_weight_spec
from compactnn.quant.sketch import SketchConfig
from compactnn.recipe import Recipe, Step

COMMAND = "python -m compactnn.bench.sketch"
THREADS = 1
MODEL = "digits-resnet"


def sketch_recipe(m: int, refine: bool) -> Recipe | str:
    """``w<m>-sketch`` (refined), or the direct approximation as a one-step recipe."""
    if refine:
        return f"w{m}-sketch"
    config = SketchConfig(weight=short_weight_spec(m), refine=False)
    return Recipe(f"w{m}-sketch-direct", (Step("sketch", config),))


def low_bit_bits(path: Path, bits: int) -> tuple[float, int, int, int]:
    """Bits per weight stored by the ``bits``-wide layers of an artifact, their weights and
    stored bytes, and the bytes of all tensor data (the file without its JSON header)."""
    header, blobs = read_artifact(path)
    tensors = parse_tensors(blobs["tensors"], path)
    units = stored_units(header, tensors)
    low = [n for n, e in header["layers"].items() if e["weight_spec"]["bits"] == bits]
    weights, stored = sum(units[n][0] for n in low), sum(units[n][1] for n in low)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return (8 * stored / weights if weights else 0.0), weights, stored, data


def measure(ref, recipe: Recipe | str, label: str, bits: int, tmp: Path) -> dict:
    """Compress, save, load; top-1 of the loaded model, bytes, bits per weight stored."""
    q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    path = tmp / label
    compactnn.save(q, path)
    loaded = compactnn.load(path, model=ref.skeleton())
    with torch.no_grad():
        exact = torch.equal(q(ref.example), loaded(ref.example))
    bpw, weights, low_bytes, data = low_bit_bits(path, bits)
    row = {"label": label, "bits": bits, "top1": float(ref.evaluate(loaded)), "exact": exact}
    row |= {"bytes": os.path.getsize(path / "model.safetensors"), "bpw": bpw}
    row |= {"weights": weights, "low_bytes": low_bytes, "data": data, "model": q}
    print(f"[sketch] {label}: {row['top1']:.2f} {row['bytes']} B {bpw:.3f} b/w", file=sys.stderr)
    return row


def layer_errors(folded: nn.Module, q: nn.Module, bits: int) -> dict[str, float]:
    """``||W - W_hat|| / ||W||`` of each ``bits``-wide layer of ``q`` (``W``: folded float)."""
    out = {}
    for name, m in q.named_modules():
        if is_quant_layer(m) and m.weight_spec.bits == bits:
            w = folded.get_submodule(name).weight.detach().float()
            out[name] = float((w - m.weight).norm() / w.norm())
    return out


def measure_all(ms: tuple[int, ...]) -> tuple[list[dict], dict[int, tuple[dict, dict]], float]:
    """Every row, the per-layer errors (direct, refined) per ``m``, and float top-1."""
    from compactnn.models import load_reference

    torch.set_num_threads(THREADS)
    ref = load_reference(MODEL, progress=False)
    folded = copy.deepcopy(ref.model)
    fold_batchnorm(folded)
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-sketch-") as tmp:
        for m in ms:
            rows.append(measure(ref, f"w{m}", f"w{m} RTN", m, Path(tmp)))
            pair = []
            for refine in (False, True):
                kind = "refined" if refine else "direct"
                row = measure(ref, sketch_recipe(m, refine), f"w{m}-sketch, {kind}", m, Path(tmp))
                rows.append(row)
                pair.append(layer_errors(folded, row["model"], m))
            errors[m] = (pair[0], pair[1])
    for row in rows:
        del row["model"]
    return rows, errors, float(ref.evaluate(ref.model))


def tables(rows: list[dict], errors: dict, float_top1: float) -> list[str]:
    """The Markdown tables and the verdict against the issue's target."""
    out = [
        "| recipe | top-1 (loaded) | model.safetensors bytes | tensor data bytes | low-bit "
        "layers: bytes | bits/weight stored | load bit-exact |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| float | {float_top1:.2f} | - | - | - | 32 | - |",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['top1']:.2f} | {r['bytes']:,} | {r['data']:,} | "
            f"{r['low_bytes']:,} | {r['bpw']:.2f} | {'yes' if r['exact'] else 'NO'} |"
        )
    by = {r["label"]: r for r in rows}
    rtn, sk = by.get("w2 RTN"), by.get("w2-sketch, refined")
    if rtn and sk:
        diff = sk["bytes"] - rtn["bytes"]
        verdict = "met" if sk["top1"] > rtn["top1"] and diff <= 0 else "not met"
        out += [
            "",
            f"Target (m = 2 refined beats `w2` RTN at equal bytes or fewer): **{verdict}**: "
            f"{sk['top1']:.2f} vs {rtn['top1']:.2f} top-1 ({sk['top1'] - rtn['top1']:+.2f} "
            f"points), {sk['bytes']:,} vs {rtn['bytes']:,} bytes ({diff:+,} B, "
            f"{100 * diff / rtn['bytes']:+.1f}%). Tensor data: {sk['data']:,} vs "
            f"{rtn['data']:,} B ({sk['data'] - rtn['data']:+,}); the low-bit layers: "
            f"{sk['low_bytes']:,} vs {rtn['low_bytes']:,} B. Tensor data are what the layers "
            "store; the rest of the file is its JSON header (one entry per tensor).",
        ]
    for m, (direct, refined) in errors.items():
        lower = sum(refined[n] < direct[n] for n in direct)
        out += [
            "",
            f"Per-layer relative reconstruction error, m = {m} (refined lower on {lower} of "
            f"{len(direct)} layers):",
            "",
            "| layer | direct | refined |",
            "|---|---:|---:|",
        ]
        out += [f"| `{n}` | {direct[n]:.4f} | {refined[n]:.4f} |" for n in direct]
    return out


def run(quick: bool = False) -> str:
    """The bench section: Markdown (``quick``: m = 2 only, a few minutes on one thread)."""
    from compactnn.measure.environment import environment

    ms = (2,) if quick else (1, 2, 3, 4)
    rows, errors, float_top1 = measure_all(ms)
    env = environment(THREADS, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    head = [
        "## Network Sketching (digits-resnet, post-training, weight-only)",
        "",
        f"```\n{COMMAND}{' --quick' if quick else ''}\n```",
        "",
        "; ".join(f"{k}: {v}" for k, v in env.items()),
        "",
        "First and last layers at 8 bits in every row; deterministic (no seed); top-1 of the "
        "loaded artifact on the held-out digits.",
        "",
    ]
    return "\n".join(head + tables(rows, errors, float_top1)) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
