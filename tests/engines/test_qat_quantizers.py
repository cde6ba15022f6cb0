import math

import pytest
import torch

from compactnn.core.qlayers import ActQuantizer, rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat_quantizers import (
    LSQAct,
    LSQWeight,
    STEWeight,
    check_act_bits,
    check_ternary_bits,
    lsq_grad_scale,
    lsq_quantize,
)
from compactnn.errors import CompactnnError


def test_forward_is_clamped_rounded_steps():
    v = torch.tensor([-3.0, -0.6, 0.2, 0.7, 2.0])
    out = lsq_quantize(v, torch.tensor(0.5), -2, 1, 1.0)
    # v/s = [-6, -1.2, 0.4, 1.4, 4] -> clamp(round, -2, 1) = [-2, -1, 0, 1, 1]
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5]))


def test_gradients_follow_the_paper():
    v = torch.tensor([-3.0, -0.6, 0.2, 0.7, 2.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    lsq_quantize(v, s, -2, 1, 0.1).sum().backward()
    # dv: 1 strictly inside (Qn, Qp), else 0
    assert torch.equal(v.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    # ds: Qn=-2 | round(-1.2)+1.2=0.2 | round(0.4)-0.4=-0.4 | Qp=1 | Qp=1, times g=0.1
    assert math.isclose(float(s.grad), 0.1 * (-2 + 0.2 - 0.4 + 1 + 1), abs_tol=1e-6)


def test_grad_scale_and_per_channel_reduction():
    assert math.isclose(lsq_grad_scale(16, 7), 1 / math.sqrt(112))
    v = torch.tensor([[0.2, 0.4], [1.0, -5.0]], requires_grad=True)
    s = torch.tensor([[1.0], [1.0]], requires_grad=True)
    lsq_quantize(v, s, -2, 1, 1.0).sum().backward()
    # row 0: (0 - 0.2) + (0 - 0.4); row 1: Qp + Qn
    assert torch.allclose(s.grad, torch.tensor([[-0.6], [-1.0]]))


def test_weight_export_reproduces_forward():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    wq = LSQWeight(w, 4)
    with torch.no_grad():  # fp16-representable steps: export is then exact
        wq.step.copy_(wq.step.to(torch.float16).float())
    exp = wq.export(w)
    grid = exp.codes.float() * exp.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(grid, wq(w).detach())
    assert exp.codes.min() >= -8 and exp.codes.max() <= 7 and exp.spec.symmetric


def test_act_init_and_export_match_actquantizer():
    torch.manual_seed(0)
    for x in (torch.relu(torch.randn(64, 10)), torch.randn(64, 10)):
        aq = LSQAct(4)
        aq.start_observing()
        assert torch.equal(aq(x), x)  # observing passes through
        aq.finish_observing()
        assert aq.signed == bool(x.min() < 0)
        with torch.no_grad():
            aq.step.copy_(aq.step.to(torch.float16).float())
        spec, scale, zero = aq.export()
        ref = ActQuantizer(spec)
        ref.set_qparams(scale, zero)
        assert torch.equal(ref(x), aq(x))


def test_weight_forward_is_rtn_with_identity_gradient():
    torch.manual_seed(0)
    spec = QuantSpec(bits=3, symmetric=False)
    w = torch.randn(4, 9, requires_grad=True)
    out = STEWeight(spec)(w)
    codes, scale, zero = rtn_weight_qparams(w, spec)
    ref = dequantize(grouped_view(codes, "channel"), scale, zero).reshape(w.shape)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_uniform_grids_refuse_one_bit_activations_and_ternary_needs_two_bits():
    with pytest.raises(CompactnnError, match="binary method"):
        check_act_bits(1, "lsq")
    with pytest.raises(CompactnnError, match="ternary"):
        check_ternary_bits(4, "ttq")
    check_act_bits(2, "lsq")
    check_ternary_bits(2, "twn")
