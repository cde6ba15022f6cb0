"""quantize_residuals(grids="all"): every add reads and writes 8-bit codes, so ONNX Runtime
runs every convolution as QLinearConv and every add as QLinearAdd."""

import collections

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.quantize import fake_quantize
from compactnn.deployment import quantize_residuals
from compactnn.errors import CompactnnError

pytest.importorskip("onnxruntime")

from compactnn.export.onnx import to_onnx_bytes
from compactnn.export.ort import optimized_graph


class Block(nn.Module):
    """A ResNet basic block: identity shortcut when shapes match, else a 1x1 convolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.short = nn.Conv2d(cin, cout, 1, stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = Block(8, 8, 1), Block(8, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b2(self.b1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def qres():
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 12, 12)
    qmodel = compactnn.compress(TinyResNet().eval(), "w8a8", calib_data=calib, progress=False)
    return qmodel, quantize_residuals(qmodel, calib, grids="all"), calib


def _fq(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return fake_quantize(x, q.scale, q.zero, q.qtype)


def test_every_add_operand_and_output_is_quantized(qres):
    qmodel, qr, calib = qres
    # b1: conv2 output, block input (shared grid), sum; b2: conv2, shortcut, sum
    assert len(qr.residual_grids) == 6
    grids = {v: qr.get_submodule(k) for k, v in qr.residual_grids.items()}
    # the hand-written b2 block: y = Q_s(relu(Q_a(conv2(.)) + Q_b(short(x))))
    x = calib[:4]
    with torch.no_grad():
        h = qmodel.b1(torch.relu(qmodel.stem(x)))
        h = _fq(grids["relu_2"], torch.relu(_fq(grids["b1_conv2"], qmodel.b1.conv2(
            torch.relu(qmodel.b1.conv1(_fq(grids["relu"], torch.relu(qmodel.stem(x))))))
        ) + _fq(grids["relu"], torch.relu(qmodel.stem(x)))))  # fmt: skip
        b = qmodel.b2
        y = torch.relu(_fq(grids["b2_conv2"], b.conv2(torch.relu(b.conv1(h))))
                       + _fq(grids["b2_short"], b.short(h)))  # fmt: skip
        y = _fq(grids["relu_4"], y)
        expected = qmodel.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))
        assert torch.allclose(qr(x), expected, atol=1e-5, rtol=0)
    # a fresh grid is the min-max grid of the value it quantizes on the calibration data,
    # with the new grids all observing at once (passing values through): the graph with the
    # shared grids only
    shared = quantize_residuals(qmodel)
    seen = []
    hook = shared.get_submodule("b2.conv2").register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        shared(calib)
    hook.remove()
    lo, hi = min(seen[0].min().item(), 0.0), max(seen[0].max().item(), 0.0)
    # (scales are rounded to float16-representable values: 2**-11 relative)
    assert float(grids["b2_conv2"].scale) == pytest.approx((hi - lo) / 255, rel=2**-11)


def test_onnx_runtime_fuses_every_conv_and_add(qres):
    _, qr, calib = qres
    counts = collections.Counter(n.op_type for n in optimized_graph(
        to_onnx_bytes(qr, calib[:8])[0]).graph.node)  # fmt: skip
    assert counts["QLinearConv"] == 6 and counts["QLinearAdd"] == 2
    assert counts["QLinearGlobalAveragePool"] == 1  # the head's grid moved before the flatten
    assert counts["Conv"] == counts["FusedConv"] == counts["Add"] == 0


def test_deployed_on_onnx_runtime_matches_the_simulation(qres):
    _, qr, calib = qres
    deployed = compactnn.deploy(qr, "onnxruntime", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 1.0
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        ref, got = qr(x), deployed(x)
    assert (ref.argmax(1) == got.argmax(1)).all()


def test_bad_arguments_are_named(qres):
    qmodel, _, calib = qres
    with pytest.raises(CompactnnError, match="calib_data"):
        quantize_residuals(qmodel, grids="all")
    with pytest.raises(CompactnnError, match="grids='some'"):
        quantize_residuals(qmodel, calib, grids="some")


class SEBlock(nn.Module):
    """MobileNetV3's pieces: conv + hardswish, squeeze-excite gate (hardsigmoid), product."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        s = self.gate(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(h, 1)))))
        h = self.proj(h * s)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_hardswish_and_squeeze_excite_run_on_integer_kernels():
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8)
    qmodel = compactnn.compress(SEBlock().eval(), "w8a8", calib_data=calib, progress=False)
    qr = quantize_residuals(qmodel, calib, grids="all")
    # hardswish is split into x * hardsigmoid(x): the same function before quantizing
    x = torch.randn(64)
    assert torch.allclose(x * nn.functional.hardsigmoid(x), nn.functional.hardswish(x))
    counts = collections.Counter(
        n.op_type for n in optimized_graph(to_onnx_bytes(qr, calib[:8])[0]).graph.node
    )
    assert counts["QLinearConv"] == 4 and counts["QLinearMul"] == 2  # hardswish, SE product
    assert counts["QLinearGlobalAveragePool"] == 2
    assert counts["Conv"] == counts["FusedConv"] == counts["Mul"] == 0
    deployed = compactnn.deploy(qr, "onnxruntime", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 1.0


def test_quantized_output_runs_the_head_as_qgemm(qres):
    qmodel, _, calib = qres
    qr = quantize_residuals(qmodel, calib, grids="all", output=True)
    head = qr.get_submodule(next(k for k, v in qr.residual_grids.items() if v == "fc"))
    plain = quantize_residuals(qmodel, calib, grids="all")
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(qr(x), _fq(head, plain(x)))  # the same logits, rounded to a grid
    ops = [n.op_type for n in optimized_graph(to_onnx_bytes(qr, calib[:8])[0]).graph.node]
    assert "QGemm" in ops and "Gemm" not in ops
    deployed = compactnn.deploy(qr, "onnxruntime", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 1.0


class PooledStem(nn.Module):
    """ResNet's stem: convolution, ReLU, 3x3 stride-2 max pool, then a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b1 = Block(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(self.pool(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_a_max_pool_runs_on_codes_with_one_grid():
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 12, 12)
    qmodel = compactnn.compress(PooledStem().eval(), "w8a8", calib_data=calib, progress=False)
    qr = quantize_residuals(qmodel, calib, grids="all")
    # the pool's output has the block's grid; its input gets none of its own (the pool
    # commutes with rounding), so the ONNX graph quantizes once before the pool
    assert "relu" not in qr.residual_grids.values()
    data = to_onnx_bytes(qr, calib[:8])[0]
    counts = collections.Counter(n.op_type for n in optimized_graph(data).graph.node)
    assert counts["MaxPool"] == 0 and counts["FusedConv"] == counts["Conv"] == 0
    assert counts["NhwcMaxPool"] + counts["QLinearMaxPool"] == 1  # on uint8 codes
    assert counts["QLinearConv"] == 3
    deployed = compactnn.deploy(qr, "onnxruntime", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 1.0
