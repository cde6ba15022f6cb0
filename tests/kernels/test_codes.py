"""The deployed graph's input quantization and max-pool of codes on direct kernels
(``csrc/codes.cpp``) equal the PyTorch ops they replace, code for code."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from compactnn.deployment.onednn import MaxPoolU8, dequantize_u8, quantize_u8
from compactnn.kernels import bitconv

CL = torch.channels_last


@pytest.fixture(scope="module")
def ext():
    if not bitconv.available():
        pytest.skip("no C++ compiler for the extension")
    return bitconv.load_extension()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
# images of 1-4 channels (interleaved 16 pixels at a time, a 5-pixel tail for w = 37), others
@pytest.mark.parametrize(
    ("n", "c", "h", "w"),
    [(1, 3, 64, 64), (2, 1, 3, 37), (1, 4, 4, 21), (2, 2, 3, 16), (2, 19, 5, 37), (3, 64, 7, 7)],
)
def test_quantize_codes_equal_the_pytorch_ops(ext, layout, n, c, h, w) -> None:
    g = torch.Generator().manual_seed(n + c + h + w)
    scale, zero = 0.0387, 114
    x = torch.randn(n, c, h, w, generator=g) * 3
    x.view(-1)[:40] = scale * (torch.arange(40) - 20 + 0.5)  # exact rounding ties
    x.view(-1)[-2:] = torch.tensor([1e6, -1e6])  # past both ends of the grid
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]  # no unit stride anywhere
    got = ext.quantize_codes(x, scale, zero, 0, 255)
    want = quantize_u8(x, (scale, zero))
    assert got.is_contiguous(memory_format=CL) and torch.equal(got, want)
    narrow = ext.quantize_codes(x, scale, zero, 100, 140)  # a narrower grid's code range
    assert torch.equal(narrow, want.clamp(100, 140))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},  # ResNet's stem pool
        {"kernel_size": 2, "stride": 2},
        {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)},
    ],
)
@pytest.mark.parametrize("channels", [24, 70])  # one masked register; a full one and a tail
def test_maxpool_codes_equal_pytorchs_quantized_pool(ext, kwargs, channels) -> None:
    from compactnn.deployment.codes import maxpool_call

    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (2, channels, 11, 13), dtype=torch.uint8, generator=g)
    q = q.contiguous(memory_format=CL)
    ref = MaxPoolU8({"dilation": 1, "ceil_mode": False, "padding": 0, **kwargs})
    direct = maxpool_call(ref)
    assert direct is not ref  # the direct kernel takes this geometry
    got = direct(q)
    assert got.is_contiguous(memory_format=CL) and torch.equal(got, ref(q))
    fl = F.max_pool2d(q.float(), **kwargs)  # max commutes with the codes
    assert torch.equal(got.float(), fl)


def test_maxpool_ceil_mode_keeps_pytorchs_op(ext) -> None:
    from compactnn.deployment.codes import maxpool_call

    m = MaxPoolU8({"kernel_size": 3, "stride": 2, "padding": 0, "dilation": 1, "ceil_mode": True})
    assert maxpool_call(m) is m


@pytest.mark.parametrize("channels_last", [True, False])
def test_dequantize_codes_equal_the_pytorch_ops(ext, channels_last) -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 256, (2, 21, 3, 9), dtype=torch.uint8, generator=g)
    if channels_last:
        q = q.contiguous(memory_format=CL)
    got = ext.dequantize_codes(q, 0.02269, 131)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, dequantize_u8(q, (0.02269, 131)))
