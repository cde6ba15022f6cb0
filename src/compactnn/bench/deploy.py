"""Benchmark section ``deploy``: int8 kernels against every float path and ONNX Runtime int8.

torchvision ResNet-18 and MobileNetV2 (random weights, batch-norm statistics set by a few
training-mode passes so activations are not degenerate), batch 8 and batch 1 at 224x224:
fp32 eager, ``torch.compile``, ONNX Runtime fp32, bf16 autocast, ONNX Runtime's own static
int8 (QDQ, per-channel), PyTorch's x86 quantized engine (FX graph mode, its own calibration),
and ``compactnn.deploy`` of the ``w8a8`` model (oneDNN, both residual modes, and the
ONNX Runtime backend). All contenders are timed round-robin in one process; ratios are to
the fastest float path of the same run. Then the reference CNN: top-1 of the deployed model
itself next to the simulated w8a8 model.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

THREADS = 2
FLOAT_PATHS = ("fp32-eager", "torch.compile", "ort-fp32", "bf16-autocast")
COMMAND = "python -m compactnn.bench --only deploy"


def _vision_model(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


def _fx_x86(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib,))
    with torch.no_grad():
        prepared(calib)
    return convert_fx(prepared)


def _contenders(model: nn.Module, calib: torch.Tensor, example: torch.Tensor) -> dict:
    """name -> callable model, or an error message (a peer failing is a finding)."""
    import compactnn
    from compactnn.bench.peers import PeerResult, float_paths, ort_models

    out: dict[str, Any] = {}
    peers = {**float_paths(model, example, THREADS), **ort_models(model, example, calib, THREADS)}
    for k, v in peers.items():
        if k != "ort-dynamic-int8":
            out[k] = v.model if isinstance(v, PeerResult) else v
    try:
        out["torch-x86-int8 (FX)"] = _fx_x86(model, calib)
    except Exception as e:
        out["torch-x86-int8 (FX)"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    out["_sim"] = qmodel
    for label, kw in (
        ("compactnn int8 onednn", {"backend": "onednn", "residual": "exact"}),
        ("compactnn int8 onednn fast", {"backend": "onednn", "residual": "fast"}),
        ("compactnn int8 ort", {"backend": "onnxruntime"}),
    ):
        try:
            out[label] = compactnn.deploy(qmodel, example=calib[:8], **kw)
        except Exception as e:
            out[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def _time_round_robin(models: dict[str, Any], x: torch.Tensor, runs: int) -> dict[str, list]:
    """Warm every model up, then time one call of each in turn, ``runs`` rounds."""
    live = {k: m for k, m in models.items() if not isinstance(m, str)}
    times: dict[str, list] = {k: [] for k in live}
    with torch.inference_mode():
        for m in live.values():
            for _ in range(3):
                m(x)
        for _ in range(runs):
            for k, m in live.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return times


def _table(name: str, models: dict[str, Any], times_by_batch: dict[int, dict]) -> list[str]:
    header = " | ".join(f"batch {b} ms | batch {b} ratio" for b in times_by_batch)
    lines = [
        f"**{name}** ({THREADS} threads; median ms, min-max when they spread > 10%; ratio = "
        "fastest float path / contender)",
        "",
        f"| contender | {header} |",
        "|---|" + "---:|---:|" * len(times_by_batch),
    ]
    best = {}
    for b, times in times_by_batch.items():
        meds = {k: statistics.median(v) for k, v in times.items()}
        best[b] = min((k for k in FLOAT_PATHS if k in meds), key=meds.get)
    for k, m in models.items():
        if k == "_sim":
            continue
        if isinstance(m, str):
            lines.append(f"| {k} | failed: {m} |" + " |" * (2 * len(times_by_batch) - 1))
            continue
        cells = []
        for b, times in times_by_batch.items():
            v = times[k]
            med = statistics.median(v)
            cell = f"{med * 1e3:.1f}"
            if (max(v) - min(v)) / med > 0.10:
                cell += f" ({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})"
            base = statistics.median(times[best[b]])
            cells += [cell, f"{base / med:.2f}x"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Fastest float path: "
        + ", ".join(f"batch {b}: {best[b]}" for b in times_by_batch)
        + ". "
        + _verification_line(models)
    )
    return lines


def _verification_line(models: dict[str, Any]) -> str:
    parts = [
        f"{k}: {m.verification.max_diff_steps:.2f} steps"
        for k, m in models.items()
        if k.startswith("compactnn") and not isinstance(m, str)
    ]
    return "Max difference to the simulated w8a8 model (batch of 8): " + "; ".join(parts) + "."


def _reference_accuracy() -> list[str]:
    import compactnn
    from compactnn.models import load_reference

    ref = load_reference("mnist-cnn", progress=False)
    qmodel = compactnn.compress(ref.model, "w8a8", calib_data=ref.calib, progress=False)
    deployed = compactnn.deploy(qmodel, example=ref.calib[0])
    sim, dep = ref.evaluate(qmodel), ref.evaluate(deployed)
    flt = ref.evaluate(ref.model)
    return [
        "**Reference CNN (`mnist-cnn`), held-out top-1** (the deployed model itself is run)",
        "",
        "| model | top-1 |",
        "|---|---:|",
        f"| float | {flt:.2f} |",
        f"| simulated w8a8 | {sim:.2f} |",
        f"| deployed int8 ({deployed.backend}, chosen by `auto`) | {dep:.2f} |",
        "",
        f"Deployed minus simulated: {dep - sim:+.2f} points (target: within 0.3). "
        f"Verification: {deployed.verification}.",
    ]


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    runs = 3 if quick else 10
    batches = (8,) if quick else (8, 1)
    names = ("resnet18",) if quick else ("resnet18", "mobilenet_v2")
    out = [
        "## Deployment: int8 kernels on CPU",
        "",
        f"`{COMMAND}` (threads: {torch.get_num_threads()}, {runs} timed rounds after warm-up, "
        "contenders interleaved round-robin in one process).",
        "",
    ]
    torch.manual_seed(0)
    for name in names:
        model = _vision_model(name)
        calib = torch.randn(16, 3, 224, 224)
        models = _contenders(model, calib, calib[:8])
        timed = {b: _time_round_robin(models, calib[:b], runs) for b in batches}
        out += [*_table(f"torchvision {name}, 224x224", models, timed), ""]
    out += _reference_accuracy()
    return "\n".join(out) + "\n"
