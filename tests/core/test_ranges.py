import torch

from compactnn.core.qtype import QType
from compactnn.core.quantize import dequantize, quantize, scale_zero_from_range
from compactnn.core.ranges import estimate_range, minmax_range, percentile_range


def _err(xg, lo, hi, qt, sym):
    s, z = scale_zero_from_range(lo, hi, qt, sym)
    return (dequantize(quantize(xg, s, z, qt), s, z) - xg).pow(2).mean().item()


def test_minmax_and_percentile_against_sorting():
    x = torch.arange(1000, dtype=torch.float32).reshape(1, 1, -1) - 500
    lo, hi = minmax_range(x)
    assert lo.item() == -500 and hi.item() == 499
    lo, hi = percentile_range(x, 99.0)
    srt = torch.sort(x.flatten()).values
    assert hi.item() == srt[round(0.99 * 999)].item()
    assert lo.item() == srt[999 - round(0.99 * 999)].item()


def test_mse_range_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    # Laplace-distributed values: heavy tails where clipping pays off at low bit widths
    u = torch.rand(4, 1, 4096, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    qt = QType(4, signed=False)
    mm = _err(x, *minmax_range(x), qt, False)
    ms = _err(x, *estimate_range(x, "mse", qt, False), qt, False)
    assert ms < 0.8 * mm
