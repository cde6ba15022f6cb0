"""Benchmark section ``deploy``: int8 kernels against every float path and ONNX Runtime int8.

torchvision ResNet-18 and MobileNetV2 (random weights, batch-norm statistics set by a few
training-mode passes so activations are not degenerate), batch 8 and batch 1 at 224x224:
fp32 eager, ``torch.compile``, ONNX Runtime fp32, bf16 autocast, ONNX Runtime's own static
int8 (QDQ, per-channel), PyTorch's x86 quantized engine (FX graph mode, its own calibration),
and ``compactnn.deploy`` of the ``w8a8`` model (oneDNN, both residual modes, the ONNX Runtime
backend, and oneDNN on the model with quantized residuals). All contenders are timed
round-robin in one process; ratios are to the fastest float path of the same run. Then the
reference CNNs: top-1 of the deployed model itself next to the simulated w8a8 model.

The timing runs in a child process started with ``OMP_WAIT_POLICY=PASSIVE`` (every OpenMP
path, float and int8 alike, then sleeps instead of spinning at barriers: on a machine shared
with other jobs the spinning threads otherwise steal the time slices the working thread
needs). A short table measured with the default policy follows, for comparison.
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from compactnn._optional import require

THREADS = 2
FLOAT_PATHS = ("fp32-eager", "torch.compile", "ort-fp32", "bf16-autocast")
COMMAND = "python -m compactnn.bench --only deploy"
QRES = "compactnn int8 onednn, quantized residuals"
POLICY = "OMP_WAIT_POLICY"
PEER_INT8 = "ort-static-int8"


def _vision_model(name: str) -> nn.Module:
    torchvision = require("torchvision", "bench")

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
    out.update(_compactnn_contenders(model, calib))
    return out


def _compactnn_contenders(model: nn.Module, calib: torch.Tensor, labels=None) -> dict:
    import compactnn
    from compactnn.deployment import quantize_residuals

    qmodel = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    sims = {"w8a8": qmodel, "w8a8 + quantized residuals": quantize_residuals(qmodel, calib)}
    out: dict[str, Any] = {"_sim": qmodel}
    for label, sim, kw in (
        ("compactnn int8 onednn", "w8a8", {"backend": "onednn", "residual": "exact"}),
        ("compactnn int8 onednn fast", "w8a8", {"backend": "onednn", "residual": "fast"}),
        ("compactnn int8 ort", "w8a8", {"backend": "onnxruntime"}),
        (QRES, "w8a8 + quantized residuals", {"backend": "onednn"}),
    ):
        if labels is not None and label not in labels:
            continue
        try:
            out[label] = compactnn.deploy(sims[sim], example=calib[:8], **kw)
        except Exception as e:
            out[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def _time_round_robin(models: dict[str, Any], x: torch.Tensor, runs: int) -> tuple[dict, dict]:
    """Warm every model up, then time one call of each in turn, ``runs`` rounds.

    Returns wall seconds and CPU seconds of the process (all its threads) per call.
    """
    live = {k: m for k, m in models.items() if not isinstance(m, str)}
    wall: dict[str, list] = {k: [] for k in live}
    cpu: dict[str, list] = {k: [] for k in live}
    with torch.inference_mode():
        for m in live.values():
            for _ in range(3):
                m(x)
        for _ in range(runs):
            for k, m in live.items():
                c0, t0 = time.process_time(), time.perf_counter()
                m(x)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return wall, cpu


def _table(name: str, models: dict[str, Any], timed: dict[int, tuple[dict, dict]]) -> list[str]:
    header = " | ".join(
        f"batch {b} ms | batch {b} ratio | batch {b} CPU ms | CPU ratio" for b in timed
    )
    lines = [
        f"**{name}** ({THREADS} threads; median wall ms, min-max when they spread > 10%; "
        "ratio = fastest float path / contender; CPU ms: median CPU time of the process per "
        "call, which time spent waiting for the machine's other jobs does not inflate)",
        "",
        f"| contender | {header} |",
        "|---|" + "---:|---:|---:|---:|" * len(timed),
    ]
    best, best_cpu = {}, {}
    for b, (wall, cpu) in timed.items():
        meds = {k: statistics.median(v) for k, v in wall.items()}
        best[b] = min((k for k in FLOAT_PATHS if k in meds), key=meds.get)
        cpus = {k: statistics.median(v) for k, v in cpu.items()}
        best_cpu[b] = min((k for k in FLOAT_PATHS if k in cpus), key=cpus.get)
    for k, m in models.items():
        if k == "_sim":
            continue
        if isinstance(m, str):
            lines.append(f"| {k} | failed: {m} |" + " |" * (4 * len(timed) - 1))
            continue
        cells = []
        for b, (wall, cpu) in timed.items():
            v = wall[k]
            med = statistics.median(v)
            cell = f"{med * 1e3:.1f}"
            if (max(v) - min(v)) / med > 0.10:
                cell += f" ({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})"
            base = statistics.median(wall[best[b]])
            c_med, c_base = statistics.median(cpu[k]), statistics.median(cpu[best_cpu[b]])
            cells += [cell, f"{base / med:.2f}x", f"{c_med * 1e3:.1f}", f"{c_base / c_med:.2f}x"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    if all(k in timed[b][0] for b in timed for k in (QRES, PEER_INT8)):
        vs = [
            f"batch {b}: {_ratio(wall, PEER_INT8, QRES)} wall, {_ratio(cpu, PEER_INT8, QRES)} CPU"
            for b, (wall, cpu) in timed.items()
        ]
        lines += [f"{QRES} against {PEER_INT8} (its time / ours): {'; '.join(vs)}.", ""]
    lines.append(
        "Fastest float path: "
        + ", ".join(f"batch {b}: {best[b]} (by CPU time: {best_cpu[b]})" for b in timed)
        + ". "
        + _verification_line(models)
    )
    return lines


def _ratio(times: dict[str, list], num: str, den: str) -> str:
    return f"{statistics.median(times[num]) / statistics.median(times[den]):.2f}x"


def _verification_line(models: dict[str, Any]) -> str:
    parts = [
        f"{k}: {m.verification.max_diff_steps:.2f} steps"
        for k, m in models.items()
        if k.startswith("compactnn") and not isinstance(m, str)
    ]
    return (
        "Max difference to the simulated model each was deployed from (batch of 8): "
        + "; ".join(parts)
        + "."
    )


def _reference_accuracy() -> list[str]:
    import compactnn
    from compactnn.deployment import quantize_residuals
    from compactnn.models import load_reference

    lines = [
        "**Reference CNNs, held-out top-1** (the deployed models themselves are run; plain "
        "w8a8 deployed with `auto`, quantized residuals on oneDNN)",
        "",
        "| reference | float | simulated w8a8 | deployed | simulated w8a8 + quantized "
        "residuals | deployed (quantized residuals) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name in ("mnist-cnn", "digits-resnet"):
        ref = load_reference(name, progress=False)
        qmodel = compactnn.compress(ref.model, "w8a8", calib_data=ref.calib, progress=False)
        qres = quantize_residuals(qmodel, ref.calib)
        dep = compactnn.deploy(qmodel, example=ref.calib[0])
        dep_r = compactnn.deploy(qres, "onednn", example=ref.calib[0])  # the path timed above
        top1 = [ref.evaluate(m) for m in (ref.model, qmodel, dep, qres, dep_r)]
        lines.append(
            f"| `{name}` | {top1[0]:.2f} | {top1[1]:.2f} | {top1[2]:.2f} ({dep.backend}) | "
            f"{top1[3]:.2f} ({len(qres.residual_grids)} residual values quantized) | "
            f"{top1[4]:.2f} ({dep_r.backend}) |"
        )
        notes.append(
            f"`{name}`: deployed minus simulated {top1[2] - top1[1]:+.2f} points, with quantized "
            f"residuals {top1[4] - top1[3]:+.2f} (target: within 0.3); quantized residuals "
            f"minus plain w8a8 simulation {top1[3] - top1[1]:+.2f}. {dep.verification}; "
            f"{dep_r.verification}."
        )
    return [*lines, "", *notes]


def _ceiling() -> list[str]:
    """GEMM rate per engine on one core (CPU time): what the hardware allows int8 over float."""
    import numpy as np

    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper

    m, k, n = 8192, 1152, 256  # a 3x3 convolution with 128 input and 256 output channels
    rng = np.random.default_rng(0)
    a32, w32 = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    a8, w8 = rng.integers(0, 255, (m, k), np.uint8), rng.integers(-127, 128, (k, n), np.int8)

    def ort_gemm(op: str, a: np.ndarray, w: np.ndarray, out_type: int):
        types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8}
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "w"], ["y"])], "gemm",
            [helper.make_tensor_value_info("a", types[a.dtype], [m, k])],
            [helper.make_tensor_value_info("y", out_type, [m, n])],
            [numpy_helper.from_array(w, "w")],
        )  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), opts)
        onnx.checker.check_model(model)
        return lambda: sess.run(None, {"a": a})

    packed = torch.ops.onednn.qlinear_prepack(torch.from_numpy(w8).t().contiguous(), None)
    x8, ws, wz = torch.from_numpy(a8), torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
    x32, t32 = torch.from_numpy(a32), torch.from_numpy(w32)
    x16, t16 = x32.bfloat16(), t32.bfloat16()
    jobs = {
        "ONNX Runtime fp32 (MatMul)": ort_gemm("MatMul", a32, w32, TensorProto.FLOAT),
        "PyTorch fp32 (mm)": lambda: x32 @ t32,
        "PyTorch bf16 (mm, oneDNN)": lambda: x16 @ t16,
        "ONNX Runtime u8s8 (MatMulInteger)": ort_gemm("MatMulInteger", a8, w8, TensorProto.INT32),
        "oneDNN u8s8 (qlinear, what deploy runs)": lambda: torch.ops.onednn.qlinear_pointwise(
            x8, 0.02, 0, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], ""
        ),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for label, job in jobs.items():
        job(), job()
        spent = []
        for _ in range(7):
            t0 = time.process_time()
            job()
            spent.append(time.process_time() - t0)
        rates[label] = m * k * n / statistics.median(spent) / 1e9
    torch.set_num_threads(threads)
    lines = [
        f"**Compute ceiling**: one {m}x{k} by {k}x{n} matrix product on one core, GMAC/s of CPU "
        "time (`time.process_time`, median of 7, so the machine's other jobs do not enter)",
        "",
        "| engine | GMAC/s |",
        "|---|---:|",
    ]
    lines += [f"| {k_} | {v:.0f} |" for k_, v in rates.items()]
    return lines


def _measure(quick: bool) -> list[str]:
    """The main tables: every contender, both models, both batches (run in the child)."""
    runs = 3 if quick else 10
    batches = (8,) if quick else (8, 1)
    names = ("resnet18",) if quick else ("resnet18", "mobilenet_v2")
    out = [
        f"`{COMMAND}` (threads: {torch.get_num_threads()}, {POLICY}="
        f"{os.environ.get(POLICY, 'unset')}, {runs} timed rounds after warm-up, contenders "
        f"interleaved round-robin in one process; load average at start: {_load()}).",
        "",
    ]
    torch.manual_seed(0)
    for name in names:
        model = _vision_model(name)
        calib = torch.randn(16, 3, 224, 224)
        models = _contenders(model, calib, calib[:8])
        timed = {b: _time_round_robin(models, calib[:b], runs) for b in batches}
        out += [*_table(f"torchvision {name}, 224x224", models, timed), ""]
    out.append(f"Load average at the end of the timing: {_load()}.")
    return out


def _default_policy(quick: bool) -> list[str]:
    """ResNet-18 batch 8 again in this process, where OpenMP threads spin (the default)."""
    from compactnn.bench.peers import PeerResult, float_paths, ort_models

    torch.manual_seed(0)
    model = _vision_model("resnet18")
    calib = torch.randn(16, 3, 224, 224)
    peers = {
        **float_paths(model, calib[:8], THREADS, with_compile=False),
        **ort_models(model, calib[:8], calib, THREADS),
    }
    models = {k: v.model for k, v in peers.items() if isinstance(v, PeerResult)}
    models.pop("ort-dynamic-int8", None)
    models.update(_compactnn_contenders(model, calib, labels=(QRES,)))
    timed = {8: _time_round_robin(models, calib[:8], 3 if quick else 5)}
    title = f"torchvision resnet18, 224x224, {POLICY} unset (OpenMP default: spinning)"
    return [*_table(title, models, timed), "", f"Load average: {_load()}."]


def _load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def _child(quick: bool) -> str:
    code = f"import sys; from compactnn.bench.deploy import run; sys.stdout.write(run({quick}))"
    env = {**os.environ, POLICY: "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"the timing child process failed: {done.stderr[-2000:]}")
    return done.stdout


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown (timing in a PASSIVE-policy child)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    if os.environ.get(POLICY, "").upper() == "PASSIVE":
        return "\n".join(_measure(quick)) + "\n"
    out = ["## Deployment: int8 kernels on CPU", "", _child(quick).rstrip(), ""]
    out += [*_default_policy(quick), ""]
    out += [*_ceiling(), ""]
    out += _reference_accuracy()
    return "\n".join(out) + "\n"
