"""Binary-basis grids (core/basis.py) and the codebook / activation-level seams of the
quantized layers, against hand computations."""

import pytest
import torch

from compactnn.core.basis import (
    basis_levels,
    basis_of_levels,
    binary01_levels,
    bit_table,
    sign_table,
)
from compactnn.core.qlayers import ActQuantizer, make_quant_layer
from compactnn.core.spec import QuantSpec


def test_tables_by_hand():
    assert sign_table(1).tolist() == [[-1.0], [1.0]]
    # code 5 = 101b: bits (1, 0, 1), most significant first
    assert sign_table(3)[5].tolist() == [1.0, -1.0, 1.0]
    assert bit_table(3)[6].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"1\.\.8"):
        sign_table(0)


def test_basis_levels_by_hand_and_against_the_matrix_product():
    # levels (-a1-a2, -a1+a2, a1-a2, a1+a2) for a = (0.875, 0.375)
    assert basis_levels(torch.tensor([0.875, 0.375])).tolist() == [-1.25, -0.5, 0.5, 1.25]
    # {0, 1} basis: v^T b = (0, v2, v1, v1 + v2)
    assert binary01_levels(torch.tensor([1.0, 0.25])).tolist() == [0.0, 0.25, 1.0, 1.25]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 2, 3, generator=g).half().float()
    ref = v.double() @ sign_table(3).double().T  # float64 reference
    assert torch.allclose(basis_levels(v).double(), ref, atol=1e-6)
    ref01 = v.double() @ bit_table(3).double().T
    assert torch.allclose(binary01_levels(v).double(), ref01, atol=1e-6)


def test_basis_is_read_back_exactly_from_its_levels():
    g = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 4):
        v = torch.rand(6, 1, m, generator=g).half().float()
        assert torch.equal(basis_of_levels(basis_levels(v)), v)
    assert basis_of_levels(torch.tensor([0.0, 1.0, 3.0, 4.5])) is None  # no basis fits
    assert basis_of_levels(torch.tensor([0.0, 1.0, 2.0])) is None  # not 2^m levels


def _layer(bits=2):
    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, symmetric=True, granularity="channel")
    return make_quant_layer(torch.nn.Conv2d(2, 3, 3), spec, None), spec


def test_set_codebook_with_a_basis_gives_the_basis_levels():
    q, spec = _layer(2)
    basis = torch.tensor([[0.5, 0.25], [1.0, 0.125], [0.75, 0.75]]).reshape(3, 1, 2)
    codes = torch.randint(spec.qtype.qmin, spec.qtype.qmax + 1, q.weight.shape)
    q.set_codebook(None, basis=basis)
    q.set_quantized_weight(codes, torch.ones(3, 1), torch.zeros(3, 1))
    assert q.format.endswith("-basis")
    # weight[o] = sum_j s_j(code - qmin) basis[o, j], written out by hand for m = 2
    idx = (codes - spec.qtype.qmin).reshape(3, -1)
    s1, s2 = (idx >> 1 & 1) * 2 - 1, (idx & 1) * 2 - 1
    ref = s1 * basis[:, 0, :1] + s2 * basis[:, 0, 1:]
    assert torch.equal(q.weight.reshape(3, -1), ref)
    with pytest.raises(ValueError, match="float16"):
        q.set_codebook(None, basis=torch.full((3, 1, 2), 0.1))
    with pytest.raises(ValueError, match="differ"):
        q.set_codebook(torch.zeros(3, 1, 4), basis=basis)


def test_levels_that_only_a_basis_stores_exactly_become_that_basis():
    q, _ = _layer(2)
    basis = torch.tensor([1.0009765625, 0.0001220703125]).expand(3, 1, 2)  # float16 values
    levels = basis_levels(basis)
    assert not torch.equal(levels, levels.half().float())
    q.set_codebook(levels)
    assert torch.equal(q.weight_basis, basis) and q.format.endswith("-basis")
    q.set_codebook(torch.tensor([-1.0, -0.5, 0.5, 1.0]).expand(3, 1, 4))  # float16 levels
    assert q.weight_basis is None and q.format.endswith("-codebook")


def test_act_levels_nearest_with_ties_up_and_straight_through_gradient():
    aq = ActQuantizer(QuantSpec(bits=2, symmetric=False))
    assert aq.is_uniform
    aq.set_levels(binary01_levels(torch.tensor([1.0, 0.25])))  # 0, 0.25, 1, 1.25
    assert not aq.is_uniform
    # thresholds 0.125, 0.625, 1.125; on a threshold the upper level
    x = torch.tensor([-3.0, 0.1, 0.125, 0.6, 0.625, 1.124, 1.125, 7.0], requires_grad=True)
    y = aq(x)
    assert y.tolist() == [0.0, 0.0, 0.25, 0.25, 1.0, 1.0, 1.25, 1.25]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="sorted"):
        aq.set_levels(torch.tensor([0.0, 1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="4"):
        aq.set_levels(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="float16"):
        aq.set_levels(torch.tensor([0.0, 0.1, 0.2, 0.3]))
