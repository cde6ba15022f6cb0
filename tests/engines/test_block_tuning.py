"""The pure pieces of block tuning match their formulas."""

import torch

from compactnn.engines.block_tuning import moved_codes, relative_error


def test_moved_codes_rounds_clamps_and_passes_gradient_straight_through():
    codes = torch.tensor([0.0, 1.0, 2.0, 3.0])
    offset = torch.tensor([0.6, -0.4, 0.9, 0.7], requires_grad=True)
    out = moved_codes(codes, offset, qmin=0, qmax=3)
    assert torch.equal(out, torch.tensor([1.0, 1.0, 3.0, 3.0]))  # 3.7 -> 4 clamps to 3
    out.sum().backward()
    # straight through everywhere, so a code on the grid's end can still be pulled back
    assert torch.equal(offset.grad, torch.ones(4))


def test_relative_error_leaves_out_masked_positions():
    target = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])  # (B=1, T=2, C=2)
    out = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, False]])
    assert float(relative_error(out, target, mask)) == 1.0  # (0 + 1) / (1 + 0)
    full = float(relative_error(out, target, None))
    assert abs(full - (1 + 49 + 49) / (1 + 4 + 4)) < 1e-6
