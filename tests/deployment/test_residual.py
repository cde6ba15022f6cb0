import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.quantize import fake_quantize
from compactnn.deployment import quantize_residuals
from compactnn.deployment.onednn import Dequantize, Int8Conv2d, Quantize
from compactnn.errors import CompactnnError
from compactnn.export.onnx import export_onnx
from tests.deployment.conftest import make_net


def steps(ref: torch.Tensor, out: torch.Tensor) -> float:
    step = (ref.max() - ref.min()).item() / 255
    return (ref - out).abs().max().item() / step


def by_hand(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SmallNet's forward written out, with the add reading the block input quantized on
    the grid the depthwise conv reads it with (what quantize_residuals should simulate)."""
    h = torch.relu(q.stem(x))
    aq = q.dw[0].input_quantizer
    hq = fake_quantize(h, aq.scale, aq.zero, aq.qtype)
    y = q.pw(q.act6(q.dw(h)))
    h = q.pool(torch.relu(hq + y))
    h = torch.cat([torch.relu(q.branch_a(h)), q.branch_b(h).relu()], dim=1)
    return q.fc(torch.flatten(q.avg(h), 1))


def test_residual_quantizers_simulate_the_add_reading_codes(qnet):
    qmodel, _ = qnet
    qres = quantize_residuals(qmodel)
    assert list(qres.residual_grids.values()) == ["relu"]  # the block input, on dw's grid
    (name,) = qres.residual_grids
    aq, dw_aq = qres.get_submodule(name), qmodel.dw[0].input_quantizer
    assert (float(aq.scale), float(aq.zero)) == (float(dw_aq.scale), float(dw_aq.zero))
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        expected, got, plain = by_hand(qmodel, x), qres(x), qmodel(x)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not torch.equal(got, plain)  # the add really reads other numbers now
    assert steps(plain, got) < 5  # and only a little: half a step on one operand


def test_deployed_graph_is_integer_through_the_residual_add(qnet):
    qmodel, calib = qnet
    qres = quantize_residuals(qmodel)
    deployed = compactnn.deploy(qres, "onednn", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 0.01  # exact up to float summation order
    convs = [m for m in deployed.program.modules() if isinstance(m, Int8Conv2d)]
    summed = [m for m in convs if m.accum is not None]
    assert len(summed) == 1 and isinstance(summed[0].accum, tuple)  # uint8 accumulator
    assert summed[0].out is not None  # and uint8 output: no float residual stream
    # only the network input is quantized and only the head's input goes through float
    conversions = [type(m) for m in deployed.program.modules() if type(m) in (Quantize, Dequantize)]
    assert conversions == [Quantize, Quantize]
    x = torch.randn(16, 3, 16, 16) * 1.5
    with torch.no_grad():
        assert steps(qres(x), deployed(x)) <= 0.01


def test_onnx_export_of_quantized_residuals(qnet, tmp_path):
    qmodel, calib = qnet
    qres = quantize_residuals(qmodel)
    result = export_onnx(qres, tmp_path / "m.onnx", example=calib[:8])
    assert result.max_diff_steps <= 1.0
    deployed = compactnn.deploy(qres, "onnxruntime", example=calib[:8])
    assert deployed.verification.max_diff_steps <= 1.0


def test_models_without_residuals_are_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(net, "w8a8", calib_data=x, progress=False)
    qres = quantize_residuals(qmodel)
    assert qres.residual_grids == {}
    with torch.no_grad():
        assert torch.equal(qres(x), qmodel(x))
    with pytest.raises(CompactnnError, match="compress"):
        quantize_residuals(make_net())


def test_shortcut_convolutions_get_a_calibrated_grid_with_calib_data():
    from compactnn.models.digits_resnet import DigitsResNet

    torch.manual_seed(0)
    net = DigitsResNet().train()
    with torch.no_grad():  # realistic batch-norm statistics
        for _ in range(3):
            net(torch.randn(32, 1, 8, 8))
    calib = torch.randn(64, 1, 8, 8)
    qmodel = compactnn.compress(net.eval(), "w8a8", calib_data=calib, progress=False)
    plain, qres = quantize_residuals(qmodel), quantize_residuals(qmodel, calib)
    # the two 1x1 shortcut convolutions (only the adds read them) get a grid of their own
    extra = set(qres.residual_grids.values()) - set(plain.residual_grids.values())
    assert extra == {"stages_1_shortcut_0", "stages_2_shortcut_0"}
    for name, value in qres.residual_grids.items():
        if value in extra:  # calibrated on calib (min-max): the grid spans the observed range
            aq = qres.get_submodule(name)
            assert aq.calibrated and float(aq.scale) > 0 and aq.qtype.bits == 8
    deployed = compactnn.deploy(qres, "onednn", example=calib[:16])
    assert deployed.verification.max_diff_steps <= 0.01
    convs = [m for m in deployed.program.modules() if isinstance(m, Int8Conv2d)]
    # every conv writes uint8 except the last block's, whose sum goes to average pooling
    assert sum(m.out is None for m in convs) == 1
    assert sum(isinstance(m.accum, tuple) for m in convs) == 2  # uint8 accumulators
