"""The lowering graph: codebook weights as exact int8 terms, and deploy-leaf modules."""

import pytest
import torch
from torch import nn

from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import conv_padding, trace, unsupported_reason, weight_terms


def _codebook_conv(levels: list[float], codes: torch.Tensor) -> nn.Module:
    """A 2-bit per-tensor codebook conv with ``codes`` (signed 2-bit or 3-bit indices)."""
    bits = {4: 2, 8: 3}[len(levels)]
    spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
    layer = make_quant_layer(nn.Conv2d(2, codes.shape[0], 1, bias=False), spec, None)
    layer.set_codebook(torch.tensor(levels).reshape(1, 1, -1))
    layer.set_quantized_weight(
        codes.reshape(layer.weight.shape), torch.ones(1, 1), torch.zeros(1, 1)
    )
    return layer


def _u8(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)


def _dequantized(terms) -> torch.Tensor:
    return sum(c.double() * s.double().reshape(-1, 1, 1, 1) for c, s in terms)


def test_symmetric_ternary_is_one_term_of_minus_one_zero_one():
    a = 0.3125
    layer = _codebook_conv([-a, 0.0, a, 0.0], _u8([[0, 1], [2, 1], [2, 0]]))
    terms = weight_terms(layer)
    assert len(terms) == 1
    codes, scale = terms[0]
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(scale, torch.full((3,), a))
    assert torch.equal(_dequantized(terms), layer.weight.double())


def test_ttq_with_a_small_integer_ratio_is_one_term():
    layer = _codebook_conv([-0.5, 0.0, 0.75, 0.0], _u8([[0, 2], [2, 1]]))
    terms = weight_terms(layer)
    assert len(terms) == 1 and torch.equal(terms[0][1], torch.tensor([0.25, 0.75]))  # per channel
    assert torch.equal(_dequantized(terms), layer.weight.double())


def test_ttq_with_any_ratio_splits_into_positive_and_negative_terms():
    an, ap = float(torch.tensor(0.1234).half()), float(torch.tensor(0.98765).half())
    layer = _codebook_conv([-an, 0.0, ap, 0.0], _u8([[0, 2], [2, 1], [0, 0]]))
    terms = weight_terms(layer)
    assert len(terms) == 2
    assert torch.equal(_dequantized(terms), layer.weight.double())  # exact, in float64


def test_powers_of_two_reaching_plus_128_flip_the_channel_or_split():
    pos = [2.0**k for k in range(-7, 1)]  # 2^-7 .. 1: +1 is 128 units of 2^-7
    levels = [0.0, *pos, *(-v for v in pos)] + [0.0] * 15  # 5-bit codebook, INQ's layout
    spec = QuantSpec(bits=5, symmetric=False, granularity="tensor")
    layer = make_quant_layer(nn.Conv2d(3, 3, 1, bias=False), spec, None)
    layer.set_codebook(torch.tensor(levels).reshape(1, 1, -1))
    # codes 8: +1, 16: -1, 1: +2^-7. Channel 0 uses +1 and 2^-7, channel 1 -1 and 2^-7,
    # channel 2 all three
    codes = _u8([[8, 1, 1], [16, 1, 1], [8, 16, 1]])
    layer.set_quantized_weight(codes.reshape(3, 3, 1, 1), torch.ones(1, 1), torch.zeros(1, 1))
    terms = weight_terms(layer)
    assert len(terms) == 2  # channel 2 needs two terms, the others one
    assert terms[0][1][0] == -(2.0**-7) and terms[0][0][0].flatten().tolist() == [-128, -1, -1]
    assert terms[0][1][1] == 2.0**-7 and terms[0][0][1].flatten().tolist() == [-128, 1, 1]
    assert torch.equal(_dequantized(terms), layer.weight.double())


def test_dorefa_float16_levels_are_two_exact_terms():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    layer = make_quant_layer(nn.Conv2d(8, 4, 3, bias=False), spec, None)
    s = torch.rand(4) + 0.05
    grid = 2 * torch.arange(16, dtype=torch.float32) / 15 - 1
    layer.set_codebook((s[:, None, None] * grid).half().float())
    codes = torch.randint(0, 16, layer.weight.shape).to(torch.uint8)
    layer.set_quantized_weight(codes, torch.ones(4, 1), torch.zeros(4, 1))
    terms = weight_terms(layer)
    assert isinstance(terms, list) and len(terms) <= 2
    assert torch.equal(_dequantized(terms), layer.weight.double())


def test_per_group_codebook_is_named_as_unsupported():
    spec = QuantSpec(bits=2, symmetric=False, granularity="group", group_size=4)
    layer = make_quant_layer(nn.Linear(8, 2, bias=False), spec, None)
    layer.set_codebook(torch.tensor([-1.0, 0.0, 1.0, 0.0]).repeat(2, 2, 1))
    assert "per-group codebook" in weight_terms(layer)


class _Binary(nn.Module):
    """Data-dependent control flow that torch.fx cannot trace, marked as a deploy leaf."""

    deploy_leaf = True

    def forward(self, x):
        return x.sign() if bool(x.sum() > 0) else -x.sign()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.block = nn.Conv2d(1, 2, 1), _Binary()

    def forward(self, x):
        return self.block(self.conv(x)) + 1


def test_deploy_leaf_modules_stay_single_nodes():
    torch.manual_seed(0)
    net = _Net().eval()
    gm = trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["conv", "block"]
    x = torch.randn(2, 1, 3, 3)
    assert torch.equal(gm(x), net(x))
    del _Binary.deploy_leaf  # without the mark, tracing meets the data-dependent branch
    try:
        with pytest.raises(CompactnnError, match="tracing failed"):
            trace(_Net())
    finally:
        _Binary.deploy_leaf = True


@pytest.mark.parametrize("attr", ["meta", "graph", "code"])
def test_attributes_a_graph_module_keeps_for_itself_are_named(attr):
    """fx.GraphModule has its own ``meta`` / ``graph`` / ``code``: a model's submodule of that
    name failed with a raw TypeError / RuntimeError from torch.fx."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, attr, nn.Linear(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, attr)(x).relu()

    with pytest.raises(CompactnnError, match=rf"attribute '{attr}'.*Rename it") as info:
        trace(Net())
    assert "\n" not in str(info.value)
    trace(nn.Sequential(nn.Linear(4, 4)))  # other names trace as before


@pytest.mark.parametrize(
    "kwargs,want",
    [
        (dict(kernel_size=3, padding="valid"), [0, 0]),
        (dict(kernel_size=3, padding="same"), [1, 1]),
        (dict(kernel_size=3, padding="same", dilation=2), [2, 2]),
        (dict(kernel_size=(1, 5), padding="same"), [0, 2]),
        (dict(kernel_size=4, padding="same", dilation=2), [3, 3]),  # even kernel, even total
        (dict(kernel_size=3, padding=(1, 2)), [1, 2]),
    ],
)
def test_string_padding_becomes_integers_where_exact(kwargs, want):
    assert conv_padding(nn.Conv2d(2, 2, **kwargs)) == want


def test_uneven_same_padding_keeps_the_layer_float_with_a_reason():
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
    act = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    layer = make_quant_layer(nn.Conv2d(2, 4, (2, 3), padding="same"), spec, act)
    layer.input_quantizer.set_qparams(torch.tensor(0.05), torch.tensor(0.0))
    why = unsupported_reason(layer)
    assert "padding='same' with kernel_size (2, 3)" in why and "pad explicitly" in why
