"""The deploy bench's roofline: MAC counts without the zero padding against a convolution of
ones (an independent count of the taps that land inside the input), and the instruction peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactnn.bench.deploy_checks import conv_work, vnni_peak
from compactnn.kernels import bitconv


def _inside(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    ones = torch.ones(1, 1, size, size)
    w = torch.ones(1, 1, k, k)
    return int(F.conv2d(ones, w, stride=stride, padding=pad, dilation=dilation).sum())


@pytest.mark.parametrize("k,stride,pad,dilation", [(7, 2, 3, 1), (3, 1, 1, 1), (3, 2, 2, 2)])
def test_conv_work_counts_the_taps_inside_the_input(k, stride, pad, dilation):
    conv = nn.Conv2d(3, 8, k, stride=stride, padding=pad, dilation=dilation)
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    net = nn.Sequential(conv, dw, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    macs, outs = conv_work(net, 20)
    h = (20 + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    want = 8 * 3 * _inside(20, k, stride, pad, dilation) + 8 * _inside(h, 3, 1, 1, 1) + 8 * 5
    assert macs == want
    assert outs == 8 * h * h * 2 + 5
    assert macs < 8 * 3 * k * k * h * h + 8 * 9 * h * h + 40  # padding taps are left out


@pytest.mark.skipif(not bitconv.available(), reason="no C++ compiler")
def test_vnni_peak_reports_the_macs_it_ran():
    ext = bitconv.load_extension()
    done = ext.vnni_peak_macs(1000, 2)
    assert done == (1000 * 2 * 12 * 64 if ext.has_vnni() else 0)
    rate = vnni_peak(1)
    assert rate is None if not ext.has_vnni() else rate > 1e9
