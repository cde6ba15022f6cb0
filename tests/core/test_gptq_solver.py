"""GPTQ's solver against direct small-matrix references."""

import pytest
import torch

from compactnn.core.gptq_solver import gptq_quantize, weighted_mse_range
from compactnn.core.qlayers import rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.spec import QuantSpec


def _deq(codes, scale, zero, spec):
    cg = grouped_view(codes, spec.granularity, spec.group_size)
    return dequantize(cg, scale, zero).reshape(codes.shape)


def _problem(seed=0, rows=24, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix  # correlated inputs: GPTQ has work to do
    return w, x


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("range_method", ["minmax", "mse"])
def test_gptq_output_error_not_above_rtn(bits, act_order, range_method):
    w, x = _problem(seed=bits)
    spec = QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=16,
                     range_method=range_method)  # fmt: skip
    codes, scale, zero = gptq_quantize(w, x.T @ x, spec, act_order=act_order)
    err_gptq = (x @ (_deq(codes, scale, zero, spec) - w).T).pow(2).sum()
    err_rtn = (x @ (_deq(*rtn_weight_qparams(w, spec), spec) - w).T).pow(2).sum()
    assert err_gptq <= err_rtn
    assert codes.min() >= spec.qtype.qmin and codes.max() <= spec.qtype.qmax


def test_gptq_with_diagonal_hessian_is_round_to_nearest():
    # no cross-column curvature: nothing to compensate, GPTQ reduces to RTN exactly
    w, _ = _problem()
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    codes, scale, zero = gptq_quantize(w, torch.eye(64), spec, act_order=False)
    rc, rs, rz = rtn_weight_qparams(w, spec)
    assert torch.equal(codes, rc.to(codes.dtype)) and torch.equal(scale, rs)
    assert torch.equal(zero, rz)


def test_weighted_mse_range_beats_minmax():
    w, _ = _problem()
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)
    wg = grouped_view(w, "group", 16)
    lo, hi = weighted_mse_range(wg, spec.qtype, False)
    from compactnn.core.quantize import quantize, scale_zero_from_range

    def err(lo, hi):
        s, z = scale_zero_from_range(lo, hi, spec.qtype, False)
        return (dequantize(quantize(wg, s, z, spec.qtype), s, z) - wg).pow(2).sum()

    assert err(lo, hi) <= err(wg.amin(-1), wg.amax(-1))


def test_weighted_mse_range_chunked_rows_equal_one_pass(monkeypatch):
    """Chunking the clip search over rows (bounded memory) gives the very same ranges."""
    from compactnn.core import gptq_solver

    torch.manual_seed(3)
    wg = torch.randn(37, 2, 16)
    weight = torch.rand(1, 2, 16)
    for symmetric in (False, True):
        qt = QuantSpec(bits=4, symmetric=symmetric).qtype
        whole = gptq_solver._mse_range_rows(wg, qt, symmetric, weight, 40, 0.3)
        monkeypatch.setattr(gptq_solver, "CLIP_CHUNK_ELEMENTS", 5 * 2 * 16 * 140)
        chunked = weighted_mse_range(wg, qt, symmetric, weight)
        monkeypatch.undo()
        assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
