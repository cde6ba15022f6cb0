import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.quant.xnor import (
    BinaryWeight,
    XNORConfig,
    binary_weight,
    sign_pm1,
    sign_ste,
    xnor_scale,
)


def test_sign_of_zero_is_plus_one_and_gradient_is_clipped_ste():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    out = sign_ste(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_binary_weight_uses_per_filter_mean_magnitude():
    w = torch.tensor([[0.5, -1.5], [0.2, 0.0]])
    out = binary_weight(w)
    alpha = torch.tensor(0.1).half().float()  # stored as float16, as in the artifact
    assert torch.equal(out, torch.stack([torch.tensor([1.0, -1.0]), alpha.repeat(2)]))
    exp = BinaryWeight().export(w)
    levels = exp.levels.reshape(2, 2)
    decoded = torch.gather(levels, 1, exp.codes.long())
    assert torch.equal(decoded, out.half().float()) and exp.spec.bits == 1  # fp16 levels


def test_activation_scale_k_is_box_filtered_channel_mean():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=1, padding=1)
    x = torch.randn(2, 3, 5, 5)
    k = xnor_scale(x, conv)
    a = torch.nn.functional.pad(x.abs().mean(1), (1, 1, 1, 1))  # (2, 7, 7)
    ref = torch.stack(
        [
            torch.stack([a[:, i : i + 3, j : j + 3].mean((1, 2)) for j in range(5)], -1)
            for i in range(5)
        ],
        -2,
    )  # (2, 5, 5)
    assert torch.allclose(k[:, 0], ref, atol=1e-6)
    assert sign_pm1(torch.zeros(1)).item() == 1.0


def test_two_stage_weights_stay_real_for_the_first_epochs():
    w = torch.tensor([[0.5, -1.5], [0.2, 0.0]])
    q = BinaryWeight(real_epochs=2)
    assert torch.equal(q(w), binary_weight(w))  # outside train(): binary
    seen = []
    for epoch in range(4):
        q.start_epoch(w, epoch, 4)
        seen.append(torch.equal(q(w), w))
    assert seen == [True, True, False, False]
    q.start_epoch(w, 0, 1)  # a one-epoch run still trains binary weights
    assert torch.equal(q(w), binary_weight(w))


def test_real_weight_epochs_must_leave_binary_epochs():
    with pytest.raises(CompactnnError, match="real_weight_epochs=6"):
        XNORConfig.from_short(1, 1, None, real_weight_epochs=6)
