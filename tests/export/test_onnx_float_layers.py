"""Layers ONNX Runtime cannot fuse into an integer kernel: a float-output head becomes a
``QGemm`` (its bias stored as int32 codes), and the deployed session stores the weights of
convolutions it runs in float dequantized (no ``DequantizeLinear`` per call; MobileNetV3-Small
w8a8 64x64 ran 1.9 ms per image against 0.35 ms)."""

import torch
from torch import nn

import compactnn
from compactnn.export.onnx import export_onnx, int32_bias_layers, to_onnx_bytes
from compactnn.export.onnx_graph import fold_float_outputs
from compactnn.export.ort import optimized_graph, ort_callable


class _HardswishNet(nn.Module):
    """``a``'s output goes through a hardswish (float in the simulation), ``b``'s into a
    residual add with a float operand: both stay float convolutions in ONNX Runtime."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        h = nn.functional.hardswish(self.a(x))
        return self.head((self.b(h) + h).flatten(1))


def _ops(data: bytes) -> list[str]:
    return [n.op_type for n in optimized_graph(data).graph.node]


def _qmodel():
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 8, 8)
    q = compactnn.compress(_HardswishNet().eval(), "w8a8", calib_data=calib, progress=False)
    return q, calib


def test_float_output_head_fuses_into_qgemm(tmp_path):
    q, calib = _qmodel()
    result = export_onnx(q, tmp_path / "m.onnx", example=calib[:8])
    data = (tmp_path / "m.onnx").read_bytes()
    ops = _ops(data)
    # the head's float bias kept it a float Gemm dequantizing its weight on every call
    assert ops.count("QGemm") == 1 and "Gemm" not in ops, ops
    assert int32_bias_layers(data) == ["head"]
    assert result.max_diff_steps < 1e-3  # the file runs exactly what it stores


def test_deployed_session_has_no_per_call_weight_dequantization():
    q, calib = _qmodel()
    data = to_onnx_bytes(q, calib[:8])[0]
    folded = fold_float_outputs(data)
    ops = _ops(folded)
    # a and b run in float (NCHWc Conv, the hardswish fused): their weights are constants now
    # (before: 5 DequantizeLinear, the weights' behind zero points the exporter shares through
    # Identity); the three left are the activations a, b and the head read
    assert ops.count("DequantizeLinear") == 3, ops
    convs = [o for o in ops if o in ("Conv", "FusedConv")]
    assert len(convs) == 2 and ops.count("Gemm") == 1, ops  # the head's weight folded too
    x = torch.randn(4, 3, 8, 8)
    # the same numbers as the file with codes
    assert torch.allclose(ort_callable(folded)(x), ort_callable(data)(x), atol=1e-5, rtol=0)
