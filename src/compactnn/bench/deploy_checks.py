"""The deploy section's checks beside its speed tables (``bench/deploy.py``): the GEMM rate
each engine reaches on one core (what the hardware allows int8 over float), the int8
instruction peak and the least time it allows the timed networks (a roofline), and the
reference CNNs' held-out top-1 measured on the deployed models themselves."""

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


def _taps_inside(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    """Kernel taps over all output positions of one dimension that land inside the input."""
    out = (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    return sum(0 <= o * stride - pad + t * dilation < size for o in range(out) for t in range(k))


def conv_work(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(multiply-accumulates, output values) of ``model``'s convolutions and linear layers for
    one ``size`` x ``size`` image, counting only the taps that land inside the input (kernels
    such as oneDNN's skip the zero padding)."""
    macs, outs = [0], [0]

    def hook(m, args, y):
        if isinstance(m, torch.nn.Conv2d):
            (_, c, h, w), (kh, kw) = args[0].shape, m.kernel_size
            th = _taps_inside(h, kh, m.stride[0], m.padding[0], m.dilation[0])
            tw = _taps_inside(w, kw, m.stride[1], m.padding[1], m.dilation[1])
            macs[0] += m.out_channels * (c // m.groups) * th * tw
        else:
            macs[0] += m.in_features * m.out_features
        outs[0] += y[0].numel()

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return macs[0], outs[0]


def vnni_peak(threads: int) -> float | None:
    """MACs per second of wall time that ``threads`` threads reach issuing nothing but
    512-bit vpdpbusd (the extension's ``vnni_peak_macs``; median of 3); None without VNNI."""
    from compactnn.kernels import bitconv

    if not bitconv.available() or not bitconv.load_extension().has_vnni():
        return None
    ext = bitconv.load_extension()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ext.vnni_peak_macs(10**6, threads)
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            done = ext.vnni_peak_macs(4 * 10**7, threads)
            rates.append(done / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(saved)
    return statistics.median(rates)


def roofline(threads: int, timed: dict[str, float] | None = None) -> list[str]:
    """The int8 instruction peak on 1 and ``threads`` threads and, for ResNet-18 and
    MobileNetV2 at 224x224, the least batch-8 time it allows (every MAC at the peak, nothing
    else). ``timed``: network -> measured ms at batch 8 to set beside it."""
    torchvision = require("torchvision", "bench")
    one, many = vnni_peak(1), vnni_peak(threads)
    if one is None or many is None:
        return ["Int8 instruction peak: not measured (no VNNI build)."]
    lines = [
        f"**Int8 instruction peak** (512-bit vpdpbusd only, 12 independent chains): "
        f"{one / 1e9:.0f} GMAC/s on one thread, {many / 1e9:.0f} on {threads}. The least "
        "batch-8 time it allows, every multiply-accumulate of the convolutions and linear "
        "layers at that peak and nothing else (taps over the zero padding not counted):",
        "",
        "| network, 224x224 | GMAC per image | output values per image | batch 8 at the peak, ms |"
        " measured, ms | share of the peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        macs, outs = conv_work(getattr(torchvision.models, name)(), 224)
        least = 8 * macs / many * 1e3
        got = (timed or {}).get(name)
        measured = f"{got:.1f} | {least / got:.0%}" if got else "- | -"
        lines.append(
            f"| {name} | {macs / 1e9:.2f} | {outs / 1e6:.1f} M | {least:.1f} | {measured} |"
        )
    return lines
