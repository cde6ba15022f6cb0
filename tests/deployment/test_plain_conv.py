"""Plain int8 convolutions on the direct kernel ``term_conv`` with one term (the plan
runner's choice for small calls): outputs equal to oneDNN's int8 convolution bit for bit,
and oneDNN kept for calls above the limit (``PLAIN_MACS``; lower with AMX)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import direct
from compactnn.deployment.direct import plain_conv_call, plain_conv_fits
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)


def _qconv(stride: int, dilation: int, seed: int = 0, out: int = 24) -> nn.Module:
    """A w8a8 conv (10 -> 24 channels: padded input groups, a 48-column tail) from compress."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(10, out, 3, stride=stride, padding=dilation, dilation=dilation)
    calib = torch.randn(8, 10, 13, 11)
    qmodel = compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)
    return qmodel[0]


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize(
    "out,unary",
    [
        ((0.05, 3), ("relu", [])),  # codes, ReLU in the clamp
        ((0.03, 7), ("hardtanh", [0.0, 0.2])),  # codes, ReLU6-like bounds
        ((0.04, 128), ("none", [])),  # codes, no post-op
        (None, ("relu", [])),  # float output
        (None, ("none", [])),
    ],
)
def test_plain_conv_equals_onednn_bit_for_bit(stride, dilation, out, unary):
    m = Int8Conv2d(_qconv(stride, dilation), out, unary)
    assert plain_conv_fits(m)
    fast = plain_conv_call(m, lambda q: pytest.fail("a small call went to oneDNN"))
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 10, 13, 11), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = m(x), fast(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert torch.equal(fast(x.contiguous()), want)  # NCHW input
    assert len(want.unique()) > 5  # not all clamped: the test can fail


def test_large_calls_stay_on_onednn(monkeypatch):
    m = Int8Conv2d(_qconv(1, 1), (0.05, 3), ("relu", []))
    calls = []

    def onednn(q):
        calls.append(tuple(q.shape))
        return m(q)

    x = torch.randint(0, 256, (2, 10, 13, 11), dtype=torch.uint8)
    # 2 x 13 x 11 output pixels x 24 x 10 x 9 MACs = 617,760
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 617_760)
    small = plain_conv_call(m, onednn)
    assert torch.equal(small(x), m(x)) and calls == []
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 617_759)
    large = plain_conv_call(m, onednn)
    assert torch.equal(large(x), m(x)) and calls == [(2, 10, 13, 11)]


@pytest.mark.parametrize("unary", [("relu", []), ("none", [])])  # oneDNN: sum, sum + ReLU
@pytest.mark.parametrize("stride", [1, 2])
def test_a_float_residual_sum_equals_onednns_sum_post_op(stride, unary):
    """The default deploy's residual add: oneDNN adds a float32 accumulator after the bias,
    then applies the post-op; ``(conv + bias) + acc`` in that order is bit-identical."""
    m = Int8Conv2d(_qconv(stride, 1), None, unary, accum="float")
    assert plain_conv_fits(m)
    fast = plain_conv_call(m, lambda q, acc: pytest.fail("a small call went to oneDNN"))
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (2, 10, 13, 11), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    oh, ow = (13, 11) if stride == 1 else (7, 6)
    acc = (3 * torch.randn(2, 24, oh, ow, generator=g)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.no_grad():
        want = m(x, acc.clone())  # oneDNN writes the sum into its accumulator
        got = fast(x, acc.clone())
        assert torch.equal(fast(x, acc.contiguous()), want)  # an NCHW accumulator
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert len(want.unique()) > 100  # not all clamped


@pytest.mark.parametrize("unary", [("relu", []), ("none", [])])
def test_a_uint8_residual_sum_equals_onednns_codes(unary):
    """Quantized residuals: oneDNN adds the uint8 accumulator as ``fma(acc - za, sa, y)``
    and quantizes ``nearbyint(y / s + zo)``. The plain order ``y + (acc - za) * sa`` (or
    ``+ zo`` after the rounding) gives other codes on a few outputs in a million: 1.6 M
    outputs at three grids, where the plain order differs, so the test can fail."""
    torch.manual_seed(11)
    conv = nn.Conv2d(32, 64, 1)
    calib = torch.randn(8, 32, 8, 8)
    q = compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 256, (2, 32, 64, 64), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = plain_conv_call(Int8Conv2d(q, None, ("none", [])), None)(x)  # conv + bias
    spread = float(y.std()) / 40  # grids about as wide as the values: few codes saturate
    plain_differs = 0
    for k, zo, ka, za in ((1.0, 7, 1.3, 100), (1.7, 0, 0.9, 12), (0.8, 13, 0.6, 77)):
        out, acc_qp = (spread * k, zo), (spread * ka, za)
        m = Int8Conv2d(q, out, unary, accum=acc_qp)
        assert plain_conv_fits(m)
        fast = plain_conv_call(m, lambda q, acc: pytest.fail("a small call went to oneDNN"))
        acc = torch.randint(0, 256, (2, 64, 64, 64), generator=g).to(torch.uint8)
        acc = acc.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            want = m(x, acc.clone())  # oneDNN writes the sum into its accumulator
            got = fast(x, acc.clone())
        assert got.dtype == torch.uint8 and torch.equal(got, want)
        assert torch.equal(fast(x, acc.contiguous()), want)  # an NCHW accumulator
        assert 100 < len(want.unique()) and (want == 255).float().mean() < 0.1
        f = y + (acc.float() - acc_qp[1]) * acc_qp[0]
        f = f.relu() if unary[0] == "relu" else f
        plain = (torch.round(f / out[0]) + out[1]).clamp(0, 255).to(torch.uint8)
        plain_differs += int((plain != want).sum())
    assert plain_differs > 0


def test_codes_use_onednns_reciprocal():
    """oneDNN writes codes as ``nearbyint(y * (1 / s) + z)``; the simulation's
    ``nearbyint(y / s) + z`` differs on a few outputs in a million for scales that are not
    float32 values: 1.6 M outputs at three grids, where that form differs (the test can fail)."""
    torch.manual_seed(13)
    conv = nn.Conv2d(32, 64, 1)
    calib = torch.randn(8, 32, 8, 8)
    q = compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]
    g = torch.Generator().manual_seed(14)
    x = torch.randint(0, 256, (2, 32, 64, 64), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = plain_conv_call(Int8Conv2d(q, None, ("none", [])), None)(x)  # conv + bias
    spread = float(y.std()) / 40
    division_differs = 0
    for k, zo, unary in (
        (1.0, 7, ("none", [])),
        (1.37, 128, ("relu", [])),
        (0.71, 0, ("none", [])),
    ):
        m = Int8Conv2d(q, (spread * k, zo), unary)
        fast = plain_conv_call(m, lambda q: pytest.fail("a small call went to oneDNN"))
        with torch.no_grad():
            want, got = m(x), fast(x)
        assert torch.equal(got, want)
        assert 100 < len(want.unique()) and (want == 255).float().mean() < 0.1
        f = y.relu() if unary[0] == "relu" else y
        division = (f / (spread * k)).round().add(zo).clamp(0, 255).to(torch.uint8)
        division_differs += int((division != want).sum())
    assert division_differs > 0


def test_fits_only_plain_single_group_layers():
    q = _qconv(1, 1)
    assert not plain_conv_fits(Int8Conv2d(q, None, ("relu", []), accum=(0.1, 5)))
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("relu", []), accum="float"))
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("sigmoid", []), accum=(0.1, 5)))
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("hardswish", [])))
    assert not plain_conv_fits(nn.Conv2d(3, 16, 3))


def test_the_limit_is_lower_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(direct, "_has_amx", lambda: True)
    assert direct.plain_macs_limit() == direct.PLAIN_MACS_AMX < direct.PLAIN_MACS
    monkeypatch.setattr(direct, "_has_amx", lambda: False)
    assert direct.plain_macs_limit() == direct.PLAIN_MACS


# 5 and 7 vectors of 16 columns (72 and 104 outputs, padded); blocks of 128 columns above
# 128, the last one only as wide as what is left: 16 (MobileNetV2's 144), 80 (200), none
# (384), 64 (MobileNetV3's 576), 104 padded to 112 (1000, a classifier's width)
@pytest.mark.parametrize("out", [72, 104, 144, 200, 384, 576, 1000])
@pytest.mark.parametrize("accum", [None, "float"])
def test_every_width_equals_onednn(out, accum):
    q = _qconv(1, 1, out=out)
    m = Int8Conv2d(q, None if accum else (0.05, 3), ("relu", []), accum=accum)
    assert plain_conv_fits(m)
    fast = plain_conv_call(m, lambda *a: pytest.fail("a small call went to oneDNN"))
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (2, 10, 7, 9), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    args = () if accum is None else (torch.randn(2, out, 7, 9, generator=g),)
    with torch.no_grad():
        want = m(x, *[a.clone() for a in args])
        got = fast(x, *args)
    assert got.shape == (2, out, 7, 9) and torch.equal(got, want)
    assert len(want.unique()) > 5


def test_wider_than_2048_stays_on_onednn():
    assert not plain_conv_fits(Int8Conv2d(_qconv(1, 1, out=2050), (0.05, 3), ("relu", [])))


@pytest.mark.parametrize("channels", [32, 30])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_reads_dense_input_in_place(channels, stride):
    """A 1x1 convolution without padding whose input is dense channels-last with channels a
    multiple of 4 skips the padded copy; other layouts (NCHW, a channel slice, 30 channels)
    take the copy: the same codes either way."""
    torch.manual_seed(21)
    conv = nn.Conv2d(channels, 48, 1, stride=stride)
    calib = torch.randn(8, channels, 9, 9)
    q = compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]
    m = Int8Conv2d(q, (0.05, 3), ("relu", []))
    fast = plain_conv_call(m, lambda q: pytest.fail("a small call went to oneDNN"))
    g = torch.Generator().manual_seed(22)
    wide = torch.randint(0, 256, (3, channels + 8, 9, 11), generator=g).to(torch.uint8)
    wide = wide.contiguous(memory_format=torch.channels_last)
    x = wide[:, :channels].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = m(x)
        assert len(want.unique()) > 5
        for layout in (x, x.contiguous(), wide[:, :channels], x[1:]):
            expected = want[1:] if layout.shape[0] == 2 else want
            assert torch.equal(fast(layout), expected)
