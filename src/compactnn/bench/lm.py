"""Benchmark section ``lm``: perplexity of the small causal LM ``tiny-lm`` once compressed.

Two tables, each row against the float model measured in the same run:

* weight-only quantization (RTN, GPTQ, GPTQ + tuning, AWQ) at 4 bits in groups of 128 and
  3 bits in groups of 32: held-out perplexity and its ratio to float (targets: within 3% at
  W4 g128, within 10% at W3 g32), artifact bytes on disk beside the theoretical size, the
  compression time and the calibration's peak resident memory;
* one-shot unstructured pruning at 50%: magnitude vs Wanda vs SparseGPT (target: both
  calibration-based methods beat magnitude).

Perplexity is per token over every held-out window of 128 tokens (``lm_text("eval")``);
calibration uses the reference's windows of the training text only.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import compactnn
from compactnn.measure.size import artifact_bytes, float_artifact_bytes, theoretical_bytes
from compactnn.measure.timing import set_threads

THREADS = 2
COMMAND = "python -m compactnn.bench --only lm"
QUANT = ["w4-g128", "w4-g128-gptq", "w4-g128-awq", "w3-g32", "w3-g32-gptq", "w3-g32-gptq_tune"]
QUICK_QUANT = ["w4-g128", "w4-g128-gptq"]
PRUNE = ["sp50", "sp50-wanda", "sp50-sparsegpt"]
TARGETS = {"w4-g128": 1.03, "w3-g32": 1.10}  # perplexity ratio to float, per bits and group


def _target(recipe: str) -> float | None:
    for prefix, limit in TARGETS.items():
        if recipe.startswith(prefix):
            return limit
    return None


def _compress(ref, recipe, tmp: Path) -> dict[str, Any]:
    try:
        return _measure(ref, recipe, tmp)
    except Exception as exc:  # a failed recipe is a finding, reported in its row
        name = recipe if isinstance(recipe, str) else recipe.name
        return {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def _measure(ref, recipe, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
    secs = time.perf_counter() - t0
    name = recipe if isinstance(recipe, str) else recipe.name
    compactnn.save(q, tmp / name.replace(":", "_"), force=True)
    peaks = q._compactnn.get("measured", {}).get("peak_rss_mib", {})
    peak = max(peaks.values(), default=None)
    ppl = ref.evaluate(q)
    print(f"[bench] lm: {name} perplexity {ppl:.4f} ({secs:.0f} s)", file=sys.stderr, flush=True)
    return {
        "name": name,
        "ppl": ppl,
        "size": artifact_bytes(tmp / name.replace(":", "_")),
        "theory": theoretical_bytes(q),
        "secs": secs,
        "peak": peak,
        "model": q,
    }


def _quant_table(rows: list[dict], base: float, fbytes: int) -> str:
    lines = [
        "| recipe | perplexity | vs float | target | size on disk (bytes) | theoretical | smaller "
        "| compress (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| float | {base:.4f} | 1.000x | | {fbytes:,} | | 1.0x | - | - |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 7)
            continue
        ratio, limit = r["ppl"] / base, _target(r["name"])
        verdict = (
            "" if limit is None else f"<= {limit:.2f}x " + ("met" if ratio <= limit else "missed")
        )
        peak = f"{r['peak']:.0f}" if r.get("peak") else "-"
        lines.append(
            f"| {r['name']} | {r['ppl']:.4f} | {ratio:.3f}x | {verdict} | {r['size']:,} | "
            f"{r['theory']:,} | {fbytes / r['size']:.1f}x | {r['secs']:.1f} | {peak} |"
        )
    return "\n".join(lines)


def _prune_table(rows: list[dict], base: float) -> str:
    from compactnn.prune.masks import sparsity_of

    lines = [
        "| recipe | perplexity | vs float | sparsity | compress (s) |",
        "|---|---|---|---|---|",
        f"| float | {base:.4f} | 1.000x | 0.0% | - |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * 3)
            continue
        nnz, total = sparsity_of(r["model"])
        lines.append(
            f"| {r['name']} | {r['ppl']:.4f} | {r['ppl'] / base:.3f}x | {1 - nnz / total:.1%} | "
            f"{r['secs']:.1f} |"
        )
    mag = next((r["ppl"] for r in rows if r["name"] == "sp50" and "ppl" in r), None)
    verdicts = [
        f"{r['name']} {'beats' if r['ppl'] < mag else 'does not beat'} magnitude"
        for r in rows
        if r["name"] != "sp50" and "ppl" in r and mag is not None
    ] or ["not measured (a run failed)"]
    return (
        "\n".join(lines)
        + "\n\nTarget (Wanda and SparseGPT beat magnitude): "
        + "; ".join(verdicts)
        + "."
    )


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    from compactnn.models import load_reference

    set_threads(THREADS)
    ref = load_reference("tiny-lm", progress=False)
    base = ref.evaluate(ref.model)
    fbytes = float_artifact_bytes(ref.model)
    quant = QUICK_QUANT if quick else QUANT
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-lm-") as tmp:
        qrows = [_compress(ref, r, Path(tmp)) for r in quant]
        prows = [_compress(ref, r, Path(tmp)) for r in PRUNE]
    n_calib = sum(int(b["input_ids"].shape[0]) for b in ref.calib)
    n_params = sum(p.numel() for p in ref.model.parameters())
    return (
        "## Small causal LM (`tiny-lm`): perplexity after compression\n\n"
        f"```\n{COMMAND}{' --quick' if quick else ''}\n```\n\n"
        f"`tiny-lm`: Llama, {n_params / 1e6:.2f} M parameters, byte-level BPE of 1,024 tokens, "
        'trained by compactnn on `lm_text("train")`. Perplexity per token on every held-out '
        f'window of 128 tokens of `lm_text("eval")`; {n_calib} calibration windows of 128 '
        "tokens of the training text; "
        f"torch.set_num_threads({THREADS}). Size: the saved artifact (`os.stat`), the float "
        "model saved the same way.\n\n"
        "### Weight-only quantization\n\n"
        + _quant_table(qrows, base, fbytes)
        + "\n\nThe default recipes keep the first and last quantized layers (`q_proj` of "
        "block 0 and `lm_head`) at 8 bits; the token table is quantized with the recipe's "
        "weight format (rounded to nearest).\n\n"
        "### One-shot pruning, 50% unstructured (every linear layer, `lm_head` included)\n\n"
        + _prune_table(prows, base)
        + "\n"
    )
