"""Benchmark: compressed transformers handed to plain ``transformers`` and to ONNX Runtime.

Issue 17's "Done when" rows for the Hugging Face formats:

* compressed-tensors: MiniLM and a tiny Llama, ``w4-g128-gptq`` and ``w8a8-smoothquant``,
  exported with :mod:`compactnn.export.ctensors` (whose packing is checked bit-exactly
  against compactnn's dequantized weights before writing), loaded back with plain
  ``transformers`` ``AutoModel*.from_pretrained`` and compared with the simulated model:
  mean per-token cosine (target >= 0.9999) and max absolute difference of the output.
* ONNX: MiniLM ``w8a8-smoothquant`` (QDQ) and ``w4-g32-gptq`` (MatMulNBits) exported with
  :mod:`compactnn.export.onnx_hf`, run in ONNX Runtime: cosine to the simulation (target
  >= 0.999) and latency beside eager float32 and the simulated model (rotating blocks,
  medians, 2 threads; run with ``OMP_WAIT_POLICY=PASSIVE``).

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.export_hf [--quick]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import compactnn
from compactnn.core.calib import main_output
from compactnn.export import ctensors, onnx_hf
from compactnn.measure.environment import cpu_description
from compactnn.measure.timing import load_average, omp_wait_policy, time_blocks

COMMAND = "python -m compactnn.bench.export_hf"
THREADS = 2
CT_RECIPES = ("w4-g128-gptq", "w8a8-smoothquant")
ONNX_RECIPES = ("w8a8-smoothquant", "w4-g32-gptq")


def tiny_llama(seed: int = 0, n_calib: int = 64) -> tuple[nn.Module, list[dict], dict]:
    """A seeded random Llama (hidden 256, so groups of 128 divide every layer), calibration
    batches of random tokens and one example prompt batch."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(n: int) -> dict:
        ids = torch.randint(4, 512, (n, 32), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, [batch(8) for _ in range(max(1, n_calib // 8))], batch(4)


def _out(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**batch)).float()


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def ct_row(name: str, recipe: str, model, calib, example, auto, tmp: Path) -> str:
    """One compressed-tensors row: export, plain-transformers load, comparison."""
    t0 = time.perf_counter()
    q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    reason = ctensors.can_export(q)
    if reason is not None:
        return f"| {name} | {recipe} | refused: {reason} | | | | |"
    folder = ctensors.export(q, tmp / f"{name}-{recipe}")
    loaded = auto.from_pretrained(folder).eval()
    sim, got = _out(q, example), _out(loaded, example)
    cos = onnx_hf.mean_cosine(sim, got)
    diff = float((sim - got).abs().max())
    float_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    met = "met" if cos >= 0.9999 else "NOT met"
    return (
        f"| {name} | {recipe} | yes (bit-exact decompression) | {cos:.6f} ({met}) | {diff:.2e} "
        f"| {_folder_mb(folder):.2f} / {float_mb:.2f} | {time.perf_counter() - t0:.0f} |"
    )


def onnx_rows(ref, recipes, tmp: Path, quick: bool) -> list[str]:
    """ONNX rows for the MiniLM reference: cosine, size and latency beside eager/simulated."""
    rows, calls = [], {"eager fp32": lambda: _out(ref.model, ref.example)}
    example = ref.example
    for recipe in recipes:
        q = compactnn.compress(ref.model, recipe, calib_data=ref.calib, progress=False)
        reason = onnx_hf.can_export(q)
        if reason is not None:
            rows.append(f"| {recipe} | refused: {reason} | | | |")
            continue
        path = onnx_hf.export(q, tmp / f"minilm-{recipe}.onnx", example=example)
        form = onnx_hf.form(q)
        run = onnx_hf.ort_runner(path.read_bytes(), form, threads=THREADS)
        cos = onnx_hf.mean_cosine(_out(q, example), run(**example))
        met = "met" if cos >= 0.999 else "NOT met"
        rows.append(f"| {recipe} | {form} | {cos:.6f} ({met}) | {path.stat().st_size / 1e6:.2f} |")
        calls[f"{recipe} simulated"] = lambda q=q: _out(q, example)
        calls[f"{recipe} ONNX Runtime"] = lambda run=run: run(**example)
    times = time_blocks(calls, runs=6 if quick else 30, threads=THREADS, warmup=2)
    lat = [f"| {name} | {t.median_s * 1e3:.1f} |" for name, t in times.items()]
    head = ["", "| runtime | median ms (batch of the reference example) |", "|---|---|"]
    return [*rows, *head, *lat]


def run(quick: bool = False) -> str:
    """The Markdown section (``quick``: fewer calibration samples and timing runs)."""
    import transformers

    from compactnn.models.minilm import build_minilm

    torch.set_num_threads(THREADS)
    n_calib = 128 if quick else 512
    ref = build_minilm(progress=False, n_calib=n_calib)
    llama, llama_calib, llama_example = tiny_llama(n_calib=n_calib)
    lines = [
        "## Hand-off to Hugging Face runtimes (compressed-tensors, ONNX)",
        "",
        f"`{COMMAND}{' --quick' if quick else ''}`; {THREADS} threads, seed 0, "
        f"{n_calib} calibration samples, OMP_WAIT_POLICY={omp_wait_policy()}, "
        f"load average {load_average()}; {cpu_description()}.",
        "",
        "compressed-tensors folder loaded by plain `transformers` vs the simulated model "
        "(MiniLM: last hidden state of the reference example; tiny Llama: logits of a "
        "32-token prompt). Target: mean cosine >= 0.9999.",
        "",
        "| model | recipe | loads in transformers | mean cosine | max abs diff "
        "| folder MB / float MB | s |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-export-") as tmp:
        tmp = Path(tmp)
        for recipe in CT_RECIPES:
            lines.append(
                ct_row(
                    "minilm", recipe, ref.model, ref.calib, ref.example, transformers.AutoModel, tmp
                )
            )
            lines.append(
                ct_row(
                    "tiny-llama",
                    recipe,
                    llama,
                    llama_calib,
                    llama_example,
                    transformers.AutoModelForCausalLM,
                    tmp,
                )
            )
        lines += [
            "",
            "MiniLM as ONNX, run in ONNX Runtime vs the simulated model. Target: cosine >= 0.999.",
            "",
            "| recipe | ONNX form | mean cosine | file MB |",
            "|---|---|---|---|",
            *onnx_rows(ref, ONNX_RECIPES, tmp, quick),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
