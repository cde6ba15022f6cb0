import torch
from torch import nn

from compactnn.core.qlayers import QuantConv2d, QuantLinear, quantize_layer_rtn
from compactnn.core.spec import QuantSpec


def sqnr(ref, out):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()).item()


def test_quant_linear_is_float_linear_on_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q = quantize_layer_rtn(lin, spec, None)
    assert isinstance(q, nn.Linear) and isinstance(q, QuantLinear)
    # independent reference: dequantize by hand from the integer codes
    codes = q.weight_codes.float().reshape(32, 4, 16)
    w_ref = ((codes - q.weight_zero.unsqueeze(-1)) * q.weight_scale.unsqueeze(-1)).reshape(32, 64)
    x = torch.randn(8, 64)
    assert torch.equal(q(x), nn.functional.linear(x, w_ref, lin.bias))
    assert q.weight_codes.min() >= 0 and q.weight_codes.max() <= 15


def test_sqnr_floor_per_bit_width():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 10, 10)
    ref = conv(x)
    floors = {8: 38.0, 6: 27.0, 4: 15.0, 3: 9.0, 2: 3.0}
    for bits, floor in floors.items():
        spec = QuantSpec(bits=bits, symmetric=bits == 8, granularity="channel")
        q = quantize_layer_rtn(conv, spec, None)
        assert isinstance(q, QuantConv2d)
        assert sqnr(ref, q(x)) > floor, bits


def test_input_quantizer_calibrates_and_quantizes():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    aspec = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    q = quantize_layer_rtn(lin, QuantSpec(bits=8), aspec)
    x = torch.rand(32, 16) * 4
    q.input_quantizer.start_observing()
    q(x)
    q.input_quantizer.finish_observing()
    scale = q.input_quantizer.scale.item()
    assert abs(scale - x.max().item() / 255) < 1e-3 * scale + 1e-6
    xq = q.input_quantizer(x)
    assert (xq - x).abs().max() <= scale / 2 + 1e-6
    assert len(torch.unique(xq)) <= 256
