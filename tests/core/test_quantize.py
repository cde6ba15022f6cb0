import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compactnn.core.qtype import QType
from compactnn.core.quantize import (
    dequantize,
    fake_quantize,
    group_fake_quantize,
    grouped_view,
    quantize,
    scale_zero_from_range,
)
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


def test_qtype_ranges():
    assert (QType(8).qmin, QType(8).qmax) == (-128, 127)
    assert (QType(4, signed=False).qmin, QType(4, signed=False).qmax) == (0, 15)
    assert (QType(1, signed=False).qmin, QType(1, signed=False).qmax) == (0, 1)
    assert QType(3).storage_dtype == torch.int8


def test_bits_out_of_range_is_a_clear_error():
    for bad in (0, 9, 16):
        try:
            QType(bad)
        except CompactnnError as e:
            assert "1..8" in str(e)
        else:
            raise AssertionError(f"accepted bits={bad}")


def test_quantize_matches_hand_formula():
    x = torch.tensor([[-1.0, -0.26, 0.0, 0.24, 0.76, 2.0]])
    qt = QType(4, signed=True)
    scale = torch.tensor([[0.25]])
    zero = torch.tensor([[1.0]])
    q = quantize(x.reshape(1, 1, -1), scale, zero, qt).reshape(-1)
    # round(x / 0.25) + 1, clamped to [-8, 7]; torch.round rounds half to even
    expected = [-4 + 1, -1 + 1, 0 + 1, 1 + 1, 3 + 1, min(8 + 1, 7)]
    assert q.tolist() == expected
    dq = dequantize(q.reshape(1, 1, -1), scale, zero).reshape(-1)
    assert torch.allclose(dq, (torch.tensor(expected, dtype=torch.float32) - 1) * 0.25)


def test_symmetric_scale_and_asymmetric_zero_point():
    qt = QType(8)
    s, z = scale_zero_from_range(torch.tensor([[-2.0]]), torch.tensor([[1.0]]), qt, True)
    assert torch.allclose(s, torch.tensor([[2.0 / 127]]), rtol=1e-3) and z.item() == 0
    qu = QType(8, signed=False)
    s, z = scale_zero_from_range(torch.tensor([[-1.0]]), torch.tensor([[3.0]]), qu, False)
    assert torch.allclose(s, torch.tensor([[4.0 / 255]]), rtol=1e-3)
    assert z.item() == round(1.0 / s.item())  # zero maps exactly to code z
    # zero is exactly representable
    q0 = quantize(torch.zeros(1, 1, 1), s, z, qu)
    assert dequantize(q0, s, z).item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 10_000),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
)
def test_round_trip_within_half_step(bits, symmetric, seed, granularity):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=g) * torch.rand(6, 1, generator=g) * 3
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=8 if granularity == "group" else None,
    )
    wg = grouped_view(w, granularity, spec.group_size)
    scale, zero = scale_zero_from_range(wg.amin(-1), wg.amax(-1), spec.qtype, symmetric)
    err = (dequantize(quantize(wg, scale, zero, spec.qtype), scale, zero) - wg).abs()
    # every value inside the range is within half a step (plus fp16 scale rounding slack)
    lo = (spec.qtype.qmin - zero) * scale
    hi = (spec.qtype.qmax - zero) * scale
    inside = (wg >= lo.unsqueeze(-1)) & (wg <= hi.unsqueeze(-1))
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-3) + 1e-7
    assert bool((err <= bound)[inside].all())
    # values the rounded zero point pushes off the grid's ends clip by at most one step
    assert bool((err <= 2 * bound).all())


def test_fake_quantize_has_straight_through_gradient():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.3), torch.tensor(0.0), QType(4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_group_size_must_divide():
    try:
        grouped_view(torch.zeros(4, 10), "group", 4)
    except CompactnnError as e:
        assert "does not divide" in str(e) and "10" in str(e)
    else:
        raise AssertionError


def test_group_fake_quantize_against_a_loop_over_groups():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.rand(64) * 4
    x[0, 0, :16] = 0.0  # an all-zero group stays zero
    got = group_fake_quantize(x, 8, 16)
    want = torch.empty_like(x, dtype=torch.float64)
    for idx in itertools.product(range(3), range(5), range(4)):
        a = x[idx[0], idx[1], idx[2] * 16 : (idx[2] + 1) * 16].double()
        s = float(a.abs().max()) / 127
        q = [0.0 if s == 0 else max(-127, min(127, round(float(v) / s))) * s for v in a]
        want[idx[0], idx[1], idx[2] * 16 : (idx[2] + 1) * 16] = torch.tensor(q)
    assert torch.equal(got[0, 0, :16], torch.zeros(16))
    assert (got.double() - want).abs().max() <= 1e-6 * x.abs().max()
    assert len(torch.unique(got[1, 2, 16:32])) <= 255
    g = torch.ones_like(x)
    x.requires_grad_(True)
    (group_fake_quantize(x, 8, 16) * g).sum().backward()
    assert torch.equal(x.grad, g)  # straight-through
    with pytest.raises(CompactnnError, match=r"group_size=24 does not divide .* 64"):
        group_fake_quantize(x, 8, 24)
