"""The deploy section's checks beside its speed tables (``bench/deploy.py``): the GEMM rate
each engine reaches on one core (what the hardware allows int8 over float) and the reference
CNNs' held-out top-1 measured on the deployed models themselves."""

from __future__ import annotations

import statistics
import time

import torch

from compactnn._optional import require


def reference_accuracy() -> list[str]:
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
        qall = quantize_residuals(qmodel, ref.calib, grids="all")
        dep_a = compactnn.deploy(qall, "onnxruntime", example=ref.calib[0])
        sim_a, got_a = ref.evaluate(qall), ref.evaluate(dep_a)
        notes.append(
            f"`{name}`, `quantize_residuals(grids='all')` on ONNX Runtime: simulated "
            f"{sim_a:.2f}, deployed {got_a:.2f} ({got_a - sim_a:+.2f} points; "
            f"{dep_a.verification})."
        )
        notes.append(
            f"`{name}`: deployed minus simulated {top1[2] - top1[1]:+.2f} points, with quantized "
            f"residuals {top1[4] - top1[3]:+.2f} (target: within 0.3); quantized residuals "
            f"minus plain w8a8 simulation {top1[3] - top1[1]:+.2f}. {dep.verification}; "
            f"{dep_r.verification}."
        )
    return [*lines, "", *notes]


def ceiling() -> list[str]:
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
