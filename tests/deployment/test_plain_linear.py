"""Int8 linear layers on the direct kernel ``term_conv`` as a 1x1 convolution of one pixel
(the plan runner's choice for small calls): outputs equal to oneDNN's int8 GEMM bit for bit,
and oneDNN kept for calls above the limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import direct
from compactnn.deployment.direct import plain_linear_call, plain_linear_fits
from compactnn.deployment.onednn import Int8Linear
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)


def _qlinear(inputs: int, outputs: int) -> nn.Module:
    torch.manual_seed(outputs)
    calib = torch.randn(16, inputs)
    seq = nn.Sequential(nn.Linear(inputs, outputs))
    return compactnn.compress(seq, "w8a8", calib_data=calib, progress=False)[0]


# (in, out): ResNet-18's head (8 blocks of 128 columns, a partial last one), a 48-column
# layer in registers, 80 columns (5 vectors), 200 columns (a partial second block), 130 inputs
# (padded channel groups)
@pytest.mark.parametrize("shape", [(512, 1000), (64, 48), (64, 80), (130, 200)])
def test_plain_linear_equals_onednn_bit_for_bit(shape):
    q = _qlinear(*shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (24, shape[0]), generator=g).to(torch.uint8)
    spread = float(Int8Linear(q, None)(x).std()) / 40  # code grids as wide as the values
    forms = [
        (None, ("none", [])),
        (None, ("relu", [])),
        ((spread * 1.3, 7), ("none", [])),  # a scale that is not a float32 value
        ((spread, 128), ("relu", [])),
        ((spread * 0.7, 3), ("hardtanh", [0.0, spread * 60])),
    ]
    for out, unary in forms:
        m = Int8Linear(q, out, unary)
        assert plain_linear_fits(m)
        fast = plain_linear_call(m, lambda q: pytest.fail("a small call went to oneDNN"))
        with torch.no_grad():
            for rows in (x, x[:1], x[:6].reshape(2, 3, -1)):  # batch 1 and leading dims
                want, got = m(rows), fast(rows)
                assert got.dtype == want.dtype and torch.equal(got, want)
        assert len(m(x).unique()) > 20  # not all clamped: the test can fail


def test_large_calls_stay_on_onednn(monkeypatch):
    m = Int8Linear(_qlinear(64, 48), (0.05, 3), ("relu", []))
    calls = []

    def onednn(q):
        calls.append(tuple(q.shape))
        return m(q)

    x = torch.randint(0, 256, (10, 64), dtype=torch.uint8)
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 10 * 64 * 48)
    assert torch.equal(plain_linear_call(m, onednn)(x), m(x)) and calls == []
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 10 * 64 * 48 - 1)
    assert torch.equal(plain_linear_call(m, onednn)(x), m(x)) and calls == [(10, 64)]


def test_fits_only_known_widths_and_post_ops():
    assert not plain_linear_fits(Int8Linear(_qlinear(16, 2100), None))  # above 2,048 columns
    assert not plain_linear_fits(Int8Linear(_qlinear(64, 48), None, ("sigmoid", [])))
    assert not plain_linear_fits(nn.Linear(4, 16))
