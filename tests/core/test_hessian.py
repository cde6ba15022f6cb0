"""Input Hessians and the damped inverse factor against direct references."""

import pytest
import torch
from torch import nn

from compactnn.core.hessian import (
    accumulate_hessian,
    drop_dead_inputs,
    inverse_hessian_factor,
    layer_inputs_2d,
)
from compactnn.errors import CompactnnError


def test_accumulated_hessian_is_xtx_over_all_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(3)]
    h = None
    for x in xs:
        h = accumulate_hessian(h, x, torch.float64)
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    torch.testing.assert_close(h, flat.T @ flat)
    assert h.dtype == torch.float64


def test_conv_inputs_unfold_to_patches():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    rows = layer_inputs_2d(conv, x)  # (B * H * W, C * kh * kw)
    assert rows.shape == (2 * 25, 2 * 9)
    w = conv.weight.reshape(4, -1)
    y = (rows @ w.T + conv.bias).reshape(2, 25, 4).transpose(1, 2).reshape(2, 4, 5, 5)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)


def test_inverse_factor_matches_the_damped_inverse():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    h = x.T @ x
    u = inverse_hessian_factor(h, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped))
    assert torch.equal(u, torch.triu(u))


def test_singular_hessian_gets_more_damping_then_a_clear_error():
    h = torch.ones(4, 4)  # rank 1: no damping at all fails
    u = inverse_hessian_factor(h, 0.0)
    assert torch.isfinite(u).all()
    with pytest.raises(CompactnnError, match=r"SparseGPT.*singular"):
        inverse_hessian_factor(torch.full((3, 3), float("nan")), 0.01, "SparseGPT")


def test_dead_inputs_get_unit_curvature_and_zero_weights():
    h = torch.diag(torch.tensor([2.0, 0.0, 3.0]))
    w = torch.ones(2, 3)
    dead = drop_dead_inputs(h, w)
    assert dead.tolist() == [False, True, False]
    assert h[1, 1] == 1.0 and torch.equal(w[:, 1], torch.zeros(2))
