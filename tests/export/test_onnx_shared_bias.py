"""Layers whose biases export equal (zero, or rounded to the same codes): the exporter shares
them through Identity nodes; each layer still stores its own int32 codes and ONNX Runtime fuses
every one into an integer kernel (10 of MobileNetV2's 52 convolutions ran in float)."""

import torch
from torch import nn

import compactnn
from compactnn.export.onnx import export_onnx, int32_bias_layers
from compactnn.export.ort import optimized_graph


class _EqualBiases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():  # zero-initialised biases (or ones that round to 0 codes)
            self.a.bias.zero_()
            self.b.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_equal_biases_each_fuse_into_qlinearconv(tmp_path):
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 12, 12)
    q = compactnn.compress(_EqualBiases().eval(), "w8a8", calib_data=calib, progress=False)
    result = export_onnx(q, tmp_path / "m.onnx", example=calib[:8])
    data = (tmp_path / "m.onnx").read_bytes()
    ops = [n.op_type for n in optimized_graph(data).graph.node]
    # a and b (outputs quantized again) fuse; c's output goes on in float (FusedConv)
    assert ops.count("QLinearConv") == 2 and ops.count("FusedConv") == 1, ops
    assert int32_bias_layers(data) == ["a", "b", "head"]
    assert result.max_diff_steps < 1e-3  # the file runs exactly what it stores
