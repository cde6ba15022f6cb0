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


def test_fits_only_plain_single_group_layers():
    q = _qconv(1, 1)
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("relu", []), accum="float"))
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("relu", []), accum=(0.1, 5)))
    assert not plain_conv_fits(Int8Conv2d(q, (0.05, 3), ("hardswish", [])))
    assert not plain_conv_fits(nn.Conv2d(3, 16, 3))


def test_the_limit_is_lower_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(direct, "_has_amx", lambda: True)
    assert direct.plain_macs_limit() == direct.PLAIN_MACS_AMX < direct.PLAIN_MACS
    monkeypatch.setattr(direct, "_has_amx", lambda: False)
    assert direct.plain_macs_limit() == direct.PLAIN_MACS


@pytest.mark.parametrize("out", [200, 384])  # blocks of 128 columns: a partial last block, three
@pytest.mark.parametrize("accum", [None, "float"])
def test_more_than_128_outputs_run_in_column_blocks(out, accum):
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


def test_wider_than_512_stays_on_onednn():
    assert not plain_conv_fits(Int8Conv2d(_qconv(1, 1, out=520), (0.05, 3), ("relu", [])))
