"""Per-tensor dynamic activations (``a8d``): ONNX's DynamicQuantizeLinear grid, code for code."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.core.qlayers import ActQuantizer
from compactnn.core.quantize import tensor_dynamic_fake_quantize
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.recipe import resolve_recipe


def _ort_codes(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """ONNX Runtime's own DynamicQuantizeLinear of ``x`` (2-D): codes, scale, zero point."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    h, t = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
        "g",
        [h.make_tensor_value_info("x", t.FLOAT, [None, None])],
        [
            h.make_tensor_value_info("y", t.UINT8, [None, None]),
            h.make_tensor_value_info("s", t.FLOAT, []),
            h.make_tensor_value_info("z", t.UINT8, []),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, s, z = sess.run(None, {"x": x.numpy()})
    return torch.from_numpy(y).long(), float(s), int(z)


@pytest.mark.parametrize("seed", range(6))
def test_values_are_onnx_runtime_codes_dequantized(seed):
    torch.manual_seed(seed)
    x = torch.randn(48, 96) * 10 ** (seed - 3)
    if seed % 2:
        x = torch.round(x * 7 / x.abs().max()) / 7  # values on a grid: ties to round
    if seed == 4:
        x = x.abs() + 0.5  # no negative value: the range still holds 0
    codes, scale, zero = _ort_codes(x)
    expected = (codes - zero).float() * torch.tensor(scale)
    assert torch.equal(tensor_dynamic_fake_quantize(x, 8), expected)


def test_zero_tensor_and_gradient():
    assert torch.equal(tensor_dynamic_fake_quantize(torch.zeros(3, 4), 8), torch.zeros(3, 4))
    x = torch.randn(5, 8, requires_grad=True)
    tensor_dynamic_fake_quantize(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 8))  # straight-through


def test_one_range_for_the_whole_tensor():
    a = torch.tensor([[0.0, 1.0], [0.0, 0.001]])
    out = tensor_dynamic_fake_quantize(a, 8)
    assert out[1, 1] == 0.0  # 0.001 < half a step of the shared range (1 / 255)
    assert out[0, 1] == 1.0


def test_spec_and_quantizer():
    spec = resolve_recipe("w8a8d").steps[0].config.act
    assert (spec.bits, spec.symmetric, spec.granularity, spec.dynamic) == (8, False, "tensor", True)
    aq = ActQuantizer(spec)
    assert aq.calibrated and aq.is_dynamic and aq.runtime_range and not aq.is_group
    aq.start_observing()
    assert aq.observer is None  # nothing to calibrate
    x = torch.randn(4, 16)
    assert torch.equal(aq(x), tensor_dynamic_fake_quantize(x, 8))
    assert "per-tensor dynamic" in repr(aq)
    with pytest.raises(CompactnnError, match="symmetric=False"):
        QuantSpec(bits=8, dynamic=True)
    with pytest.raises(CompactnnError, match="one range per tensor"):
        QuantSpec(bits=8, symmetric=False, granularity="channel", dynamic=True)
    assert QuantSpec.from_dict({"bits": 8, "symmetric": False}).dynamic is False  # old headers


def test_compress_needs_no_calibration_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    q = compactnn.compress(model, "w8a8d", progress=False)
    x = torch.randn(6, 16)
    h = tensor_dynamic_fake_quantize(x, 8)
    expected = q[2](q[1](torch.nn.functional.linear(h, q[0].weight, q[0].bias)))
    assert torch.allclose(q(x), expected, atol=1e-6)
    compactnn.save(q, tmp_path / "a")
    back = compactnn.load(tmp_path / "a", model=model)
    assert back[0].input_quantizer.is_dynamic
    assert torch.equal(back(x), q(x))
