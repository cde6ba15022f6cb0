"""Benchmark section ``nbits_rows``: what one row of activations costs each ONNX Runtime matmul.

MiniLM's batch 1 (one sentence, 33 tokens) multiplies 33-row activations by every weight;
its batch 64 (64 x 61 padded tokens) by 3,904 rows. This section times the four linear layers
of one MiniLM encoder layer (384 -> 1152 merged Q/K/V, 384 -> 384, 384 -> 1536, 1536 -> 384)
as one ONNX graph per operator, for 1 to 3,904 rows, each operator on the same shapes:

* ``MatMul`` fp32 (MLAS SGEMM, the float path);
* ``DynamicQuantizeMatMul``: per-tensor uint8 activations by int8 weights with a scale per
  output column (the ``w8a8d`` form);
* ``MatMulNBits`` 4-bit, blocks of 32 with zero points (the ``w4-g32`` forms), at
  ``accuracy_level=0`` (float compute on the 4-bit codes: the exact form ``to_ort_nbits``
  keeps for weight-only recipes that drift at level 4) and ``accuracy_level=4`` (int8
  activations per block, VNNI).

Random weights and codes (timing only); one session per operator, all shapes in one graph, so
each call is the layer's four products. The table gives the median per call and per row, and
each operator's time against fp32 ``MatMul`` at the same rows: where a 4-bit kernel is not
faster than fp32 at 33 rows, no 4-bit ONNX Runtime graph of MiniLM can be much faster than
the float graph at batch 1, whatever the rest of the graph does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from compactnn.measure.environment import cpu_description
from compactnn.measure.timing import time_blocks

THREADS = int(os.environ.get("COMPACTNN_BENCH_THREADS", "2"))
SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))  # (K, N) of one MiniLM layer
ROWS = (1, 8, 33, 256, 3904)
QUICK_ROWS = (1, 33, 256)
OPS = ("MatMul fp32", "DynamicQuantizeMatMul int8", "MatMulNBits 4-bit level 0")
OPS += ("MatMulNBits 4-bit level 4",)
BLOCK = 32
COMMAND = "python -m compactnn.bench --only nbits_rows"


def _node(op: str, i: int, k: int, n: int, rng: np.random.Generator) -> tuple[Any, list]:
    """The ONNX node of one product ``A_k [rows, k] @ W [k, n]`` and its initializers."""
    from onnx import helper, numpy_helper

    x, y, w = f"A{k}", f"Y{i}", f"W{i}"
    if op == "MatMul fp32":
        weight = rng.standard_normal((k, n)).astype(np.float32) * 0.05
        return helper.make_node("MatMul", [x, w], [y]), [numpy_helper.from_array(weight, w)]
    if op == "DynamicQuantizeMatMul int8":
        inits = [
            numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), w),
            numpy_helper.from_array(np.full((n,), 0.01, np.float32), w + "s"),
            numpy_helper.from_array(np.zeros((n,), np.int8), w + "z"),
        ]
        node = helper.make_node(
            "DynamicQuantizeMatMul", [x, w, w + "s", w + "z"], [y], domain="com.microsoft"
        )
        return node, inits
    blocks = k // BLOCK
    codes = rng.integers(0, 16, (n, blocks, BLOCK)).astype(np.uint8)
    zeros = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
    zeros = np.pad(zeros, ((0, 0), (0, blocks % 2)))
    inits = [
        numpy_helper.from_array(codes[..., 0::2] | (codes[..., 1::2] << 4), w),
        numpy_helper.from_array(rng.random(n * blocks).astype(np.float32) * 0.01, w + "s"),
        numpy_helper.from_array((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1), w + "z"),
    ]
    level = int(op.rsplit(" ", 1)[1])
    node = helper.make_node(
        "MatMulNBits", [x, w, w + "s", w + "z"], [y], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=level,
    )  # fmt: skip
    return node, inits


def _session(op: str, threads: int) -> Any:
    """One ONNX Runtime session computing the four products of one MiniLM layer."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, (k, n) in enumerate(SHAPES):
        node, init = _node(op, i, k, n, rng)
        nodes.append(node)
        inits += init
    dims = sorted({k for k, _ in SHAPES})
    inputs = [helper.make_tensor_value_info(f"A{k}", TensorProto.FLOAT, ["rows", k]) for k in dims]
    outputs = [
        helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["rows", n])
        for i, (_, n) in enumerate(SHAPES)
    ]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(rows: tuple[int, ...], threads: int, runs: int = 27) -> dict[int, dict[str, Any]]:
    """Per row count, ``{operator: Timing}`` of one call (the layer's four products)."""
    sessions = {op: _session(op, threads) for op in OPS}
    rng = np.random.default_rng(1)
    out = {}
    for m in rows:
        feeds = {f"A{k}": rng.standard_normal((m, k)).astype(np.float32) for k, _ in SHAPES}
        calls = {op: (lambda s=s, f=feeds: s.run(None, f)) for op, s in sessions.items()}
        out[m] = time_blocks(calls, warmup=2, runs=runs, threads=threads, rounds=9, block_s=0.2)
    return out


def table(timings: dict[int, dict[str, Any]]) -> str:
    """Markdown: per rows and operator, median per call and per row, CPU, ratio to fp32."""
    lines = [
        "| rows | operator | per call | per row | cpu per call | fp32 MatMul / this |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for m, per_op in timings.items():
        base = per_op["MatMul fp32"].median_s
        for op, t in per_op.items():
            cpu = f"{t.cpu_s * 1e6:.0f} us" if t.cpu_s else "-"
            lines.append(
                f"| {m} | {op} | {t.median_s * 1e6:.0f} us | {t.median_s * 1e6 / m:.2f} us | "
                f"{cpu} | {base / t.median_s:.2f}x |"
            )
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure and return the section's Markdown."""
    import onnxruntime as ort

    timings = measure(QUICK_ROWS if quick else ROWS, THREADS, runs=9 if quick else 27)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
    macs = sum(k * n for k, n in SHAPES)
    return (
        "## ONNX Runtime matmuls per row of activations (one MiniLM layer's shapes)\n\n"
        f"```\n{env}{COMMAND}{' --quick' if quick else ''}\n```\n\n"
        + table(timings)
        + f"\n\n{cpu_description()}; onnxruntime {ort.__version__}, {THREADS} intra-op "
        f"threads (no spinning), load average {load:.1f} at the end. One call = the four "
        f"products of one MiniLM layer ({macs / 1e6:.2f} M multiply-accumulates per row); "
        "random weights; 4-bit weights in blocks of 32 with zero points. Each operator timed "
        "in its own warm blocks, nine rotating rounds per row count, median; per row = per "
        "call / rows. MiniLM's batch 1 is 33 rows (one sentence), its batch 64 is 3,904.\n"
    )
