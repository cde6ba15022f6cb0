"""Benchmark section ``deploy_inductor``: compactnn's int8 graph compiled by Inductor.

The question it answers (issue 13, docs/deploy.md): does PyTorch's compiled int8 path
(``torch.compile`` with ``freezing=True``, oneDNN ``qconv_pointwise`` kernels, everything
between them fused into generated C++) run compactnn's own w8a8 graph faster than ONNX
Runtime's ``quantize_static`` model, which is the fastest int8 contender on Zen 4 without AMX?

What is compiled: ``compactnn.deploy(sim, "inductor")`` (``deployment/inductor.py``) of the
``quantize_residuals`` simulation: the graph of the ``onednn`` backend (compactnn's own grids,
scales, zero points and int8 weight codes) compiled by ``torch.compile`` with freezing, per
input shape, oneDNN ``qconv_pointwise`` kernels with everything between them fused into C++.

Contenders, each timed in its own block of calls after a pause, three rounds in rotating
order (:func:`compactnn.measure.timing.time_blocks`), wall-time median and process CPU time
per call: compactnn oneDNN (the eager plan runner), compactnn Inductor, PyTorch's FX x86 int8,
ONNX Runtime ``quantize_static`` (QDQ, per channel) and ONNX Runtime fp32. torchvision
ResNet-18 and MobileNetV3-Small with random weights and realistic batch-norm statistics (as in
``bench/deploy.py``), 224x224 and 64x64, batch 1 and 8. ``--quick``: ResNet-18 at 64x64.

The timing runs in a child process started with ``OMP_WAIT_POLICY=PASSIVE`` (see
``bench/deploy.py``). Run: ``python -m compactnn.bench --only deploy_inductor [--quick]``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from compactnn.bench.deploy import _child as deploy_child

THREADS = 2
BATCHES = (1, 8)
SHAPES_FULL = (
    ("resnet18", 224),
    ("resnet18", 64),
    ("mobilenet_v3_small", 224),
    ("mobilenet_v3_small", 64),
)
SHAPES_QUICK = (("resnet18", 64),)
SHAPES_ENV = "COMPACTNN_BENCH_INDUCTOR_SHAPES"  # e.g. "resnet18:224,mobilenet_v3_small:64"
COMMAND = "python -m compactnn.bench --only deploy_inductor"
POLICY = "OMP_WAIT_POLICY"
SPEED_TOLERANCE = 8.0  # random weights amplify one-code flips (see bench/deploy.py)
ONEDNN, INDUCTOR = "compactnn oneDNN", "compactnn Inductor"
FX, ORT_STATIC, ORT_FP32 = "FX x86 int8", "ORT quantize_static", "ORT fp32"
COLUMNS = (ONEDNN, INDUCTOR, FX, ORT_STATIC, ORT_FP32)


def _contenders(name: str, size: int) -> tuple[dict[str, Any], nn.Module]:
    """Every contender (the Inductor one compiled at batch 8): name -> model or error."""
    import compactnn
    from compactnn.bench.deploy import _vision_model
    from compactnn.bench.peers import PeerResult, fx_x86_int8, ort_models
    from compactnn.deployment import quantize_residuals

    torch.manual_seed(0)
    model = _vision_model(name, size)
    calib = torch.randn(16, 3, size, size)
    qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    sim = quantize_residuals(qmodel, calib)
    out: dict[str, Any] = {}
    for label, backend in ((ONEDNN, "onednn"), (INDUCTOR, "inductor")):
        try:
            out[label] = compactnn.deploy(
                sim, backend, example=calib[:8], tolerance=SPEED_TOLERANCE
            )
        except Exception as e:  # a failed compile or verification is a finding
            out[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    peers = ort_models(model, calib[:8], calib, THREADS)
    for label, key in ((ORT_STATIC, "ort-static-int8"), (ORT_FP32, "ort-fp32")):
        peer = peers.get(key)
        out[label] = peer.model if isinstance(peer, PeerResult) else str(peer)
    try:
        out[FX] = fx_x86_int8(model, calib).model
    except Exception as e:  # a peer failing is a finding
        out[FX] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out, sim


def _row(name: str, size: int, batch: int, models: dict, extra: dict) -> tuple[str, str]:
    from compactnn.measure.timing import time_blocks

    x = torch.randn(batch, 3, size, size)
    live = {k: m for k, m in models.items() if callable(m)}
    timed = time_blocks({k: (lambda m=m: m(x)) for k, m in live.items()}, batch=batch)
    cells = []
    for k in COLUMNS:
        t = timed.get(k)
        cells.append(f"{t.median_s * 1e3:.2f} ({t.cpu_s * 1e3:.2f})" if t else "failed")
    ratio = "-"
    if INDUCTOR in timed and ORT_STATIC in timed:
        ratio = f"{timed[ORT_STATIC].median_s / timed[INDUCTOR].median_s:.2f}x"
    row = f"| {name} {size} | {batch} | " + " | ".join(cells) + f" | {ratio} |"
    note = (
        f"{name} {size} batch {batch}: Inductor compile {extra['compile_s']:.1f} s, "
        f"verification against the simulation {extra['gap']}; {timed[ONEDNN].conditions()}"
    )
    return row, note


def _measure(quick: bool) -> list[str]:
    from compactnn.lowering.verify import compare
    from compactnn.measure.environment import cpu_description

    head = "| model, input | batch | " + " | ".join(COLUMNS) + " | Inductor vs ORT static |"
    rows, notes, errors = [head, "|" + "---|" * (len(COLUMNS) + 3)], [], []
    for name, size in _shapes(quick):
        models, sim = _contenders(name, size)
        errors += [f"{name} {size} {k}: {v}" for k, v in models.items() if isinstance(v, str)]
        for batch in BATCHES:
            x = torch.randn(batch, 3, size, size)
            extra = {"compile_s": float("nan"), "gap": "-"}
            ind = models.get(INDUCTOR)
            if callable(ind):
                check = compare(sim, ind, x, "inductor", SPEED_TOLERANCE)  # compiles this shape
                extra["gap"] = f"{check.max_diff_steps:.3f} steps"
                extra["compile_s"] = ind.program.compile_seconds[((batch, 3, size, size),)]
            row, note = _row(name, size, batch, models, extra)
            rows.append(row)
            notes.append(note)
    intro = (
        f"`{_command(quick)}` on {cpu_description()} ({THREADS} threads, {POLICY}="
        f"{os.environ.get(POLICY, 'unset')}, each contender in its own block of calls after a "
        "pause, 3 rotating rounds; wall-time median ms, process CPU ms per call in brackets; "
        f"load average at the end: {_load()})."
    )
    return [intro, "", *rows, "", *[f"- {n}" for n in notes], *[f"- failed: {e}" for e in errors]]


def _shapes(quick: bool) -> tuple[tuple[str, int], ...]:
    spec = os.environ.get(SHAPES_ENV, "").strip()
    if not spec:
        return SHAPES_QUICK if quick else SHAPES_FULL
    pairs = [item.split(":") for item in spec.split(",") if item.strip()]
    return tuple((n.strip(), int(s)) for n, s in pairs)


def _command(quick: bool) -> str:
    spec = os.environ.get(SHAPES_ENV, "").strip()
    prefix = f"{SHAPES_ENV}={spec} " if spec else ""
    return f"{prefix}{COMMAND}{' --quick' if quick else ''}"


def _load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def timing_text(quick: bool = False) -> str:
    """The table alone (what the PASSIVE-policy child prints)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    return "\n".join(_measure(quick)) + "\n"


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown (timed in a child process with
    ``OMP_WAIT_POLICY=PASSIVE`` unless this process already has it)."""
    if os.environ.get(POLICY, "").upper() == "PASSIVE":
        text = timing_text(quick)
    else:
        text = deploy_child(quick, "compactnn.bench.deploy_inductor")
    return "## Deployment: Inductor-compiled int8 graph against ONNX Runtime\n\n" + text


if __name__ == "__main__":
    sys.stdout.write(run(quick="--quick" in sys.argv))
