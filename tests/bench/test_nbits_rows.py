"""The per-row matmul bench times the products it names (outputs against numpy)."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from compactnn.bench import nbits_rows


def _run(op: str, k: int, n: int, a: np.ndarray) -> tuple[np.ndarray, dict]:
    import onnxruntime as ort

    node, inits = nbits_rows._node(op, 0, k, n, np.random.default_rng(3))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(f"A{k}", TensorProto.FLOAT, ["r", k])],
        [helper.make_tensor_value_info("Y0", TensorProto.FLOAT, ["r", n])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {f"A{k}": a})[0], {t.name: numpy_helper.to_array(t) for t in inits}


def _unpack(b: np.ndarray) -> np.ndarray:
    """Low nibble first, as MatMulNBits reads its bytes."""
    return np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)


@pytest.mark.parametrize("level", [0, 4])
def test_matmulnbits_node_is_the_dequantized_product(level):
    k, n = 64, 24
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    y, w = _run(f"MatMulNBits 4-bit level {level}", k, n, a)
    blocks = k // nbits_rows.BLOCK
    codes = _unpack(w["W0"]).reshape(n, blocks, nbits_rows.BLOCK).astype(np.float32)
    zeros = _unpack(w["W0z"]).reshape(n, -1)[:, :blocks].astype(np.float32)
    scales = w["W0s"].reshape(n, blocks)
    weight = ((codes - zeros[..., None]) * scales[..., None]).reshape(n, k)
    ref = a @ weight.T
    tol = 1e-4 if level == 0 else 0.02 * np.abs(ref).max()  # level 4: int8 activations
    assert np.abs(y - ref).max() <= tol


def test_fp32_and_dynamic_int8_nodes():
    k, n = 32, 16
    a = np.random.default_rng(1).standard_normal((4, k)).astype(np.float32)
    y, w = _run("MatMul fp32", k, n, a)
    np.testing.assert_allclose(y, a @ w["W0"], rtol=1e-5, atol=1e-5)
    y, w = _run("DynamicQuantizeMatMul int8", k, n, a)
    ref = (a @ w["W0"].astype(np.float32)) * w["W0s"]
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()  # per-tensor uint8 activations


def test_table_ratio_and_per_row():
    from compactnn.measure.timing import Timing

    def t(s):
        return Timing(s, s, s, 9, 2, 9, cpu_s=2 * s)

    per_op = {"MatMul fp32": t(0.0033), "MatMulNBits 4-bit level 4": t(0.0011)}
    text = nbits_rows.table({33: per_op})
    assert "| 33 | MatMulNBits 4-bit level 4 | 1100 us | 33.33 us | 2200 us | 3.00x |" in text
