"""Power-of-two codebooks reaching +128 units (INQ at 5 bits) in the QDQ file as int8 codes
with a negative per-channel scale (they were stored float32 with no warning: a 216 KB file
for 208 KB of float weights), and the warning export_onnx gives for layers it stores float."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import compactnn
from compactnn.export.onnx import export_onnx, to_onnx_bytes
from compactnn.lowering.graph import weight_terms
from tests.export._conv_net import conv_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_inq_rows_reaching_plus_128_units_are_int8_codes(tmp_path):
    calib = torch.randn(32, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(conv_net(), "w5a8-inq", calib_data=calib, progress=False)
    # the case: a row whose int8 form needs a negative scale on a -128 code (+128 units)
    negative = [
        n for n, m in q.named_modules() if hasattr(m, "weight_levels")
        for codes, scale in weight_terms(m)
        if bool(((scale < 0) & (codes.reshape(len(scale), -1) == -128).any(1)).any())
    ]  # fmt: skip
    assert negative == ["2", "5"]
    data, kept = to_onnx_bytes(q, calib[:8])
    assert kept == {}  # was: '2' and '5' "stored dequantized (float) in ONNX"
    proto = onnx.load_from_string(data)
    inits = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    assert not [a for a in inits if a.dtype == np.float32 and a.size >= 72]  # no float weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(q, tmp_path / "m.onnx", example=calib[:8])
    assert result.max_diff_steps < 1e-3, result
    assert not [w for w in caught if "float32 weights" in str(w.message)]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: calib.numpy()})[0]
    with torch.no_grad():
        ref = q(calib).numpy()
    assert (out.argmax(1) == ref.argmax(1)).all() and np.abs(out - ref).max() < 1e-2


def _qdq_conv(codes: np.ndarray, scale: np.ndarray) -> bytes:
    """Q/DQ -> Conv(DQ(codes, scale)) -> Q/DQ, the pattern ONNX Runtime fuses."""
    h, nh = onnx.helper, onnx.numpy_helper
    rows = len(scale)
    inits = [
        nh.from_array(codes, "w"), nh.from_array(scale.astype(np.float32), "ws"),
        nh.from_array(np.zeros(rows, np.int8), "wz"), nh.from_array(np.float32(0.05), "xs"),
        nh.from_array(np.uint8(128), "xz"), nh.from_array(np.float32(0.2), "ys"),
        nh.from_array(np.uint8(128), "yz"),
    ]  # fmt: skip
    nodes = [
        h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        h.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
        h.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
    ]
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 8, 8])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    model = h.make_model(
        h.make_graph(nodes, "g", [x], [y], inits), opset_imports=[h.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_onnx_runtime_fuses_a_negative_scale_to_the_same_outputs(tmp_path):
    """What the negative-scale rows rely on: QLinearConv runs them, equal to the flipped form."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(8, 4, 3, 3)).astype(np.int8)
    sign = np.array([1, -1, 1, -1, -1, 1, 1, -1], np.float32)
    scale = (rng.random(8).astype(np.float32) * 0.01 + 0.001) * sign
    x = {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * 3}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    negative = ort.InferenceSession(_qdq_conv(codes, scale), options)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops  # fused into the integer kernel
    flipped = (codes * sign[:, None, None, None]).astype(np.int8)
    positive = ort.InferenceSession(_qdq_conv(flipped, np.abs(scale)))
    a, b = negative.run(None, x)[0], positive.run(None, x)[0]
    assert np.array_equal(a, b) and np.abs(a).max() > 0


def test_layers_stored_float_are_named_with_their_share_of_the_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q = compactnn.compress(net, "w4-g32", calib_data=x, progress=False)
    with pytest.warns(UserWarning, match="float32 weights") as caught:
        export_onnx(q, tmp_path / "m.onnx", example=x[:8])
    text = next(str(w.message) for w in caught if "float32 weights" in str(w.message))
    size = (tmp_path / "m.onnx").stat().st_size
    share = 4 * (64 * 64 * 2 + 64 * 10) / size
    assert text.startswith("ONNX m.onnx: 3 quantized layers stored as float32 weights")
    assert "0, 2, 4 (per-group weights: stored dequantized (float) in ONNX)" in text
    assert f"{share:.0%} of the {size / 1024:.0f} KB file" in text, text
