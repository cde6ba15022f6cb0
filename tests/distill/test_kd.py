import math

import pytest
import torch
from torch import nn

from compactnn.distill import DistillationLoss, kd_loss
from compactnn.errors import CompactnnError


def test_kd_loss_is_t_squared_kl_of_softened_logits():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    temp = 2.0
    p = [math.exp(v / temp) for v in (2.0, 0.0, 1.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / temp) for v in (1.0, 2.0, 0.5)]
    q = [v / sum(q) for v in q]
    expected = temp**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert math.isclose(float(kd_loss(s, t, temp)), expected, rel_tol=1e-5)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-7)


def test_t_squared_keeps_gradient_scale_comparable():
    torch.manual_seed(0)
    s = torch.randn(64, 10, requires_grad=True)
    t = torch.randn(64, 10)
    norms = []
    for temp in (4.0, 8.0):
        (g,) = torch.autograd.grad(kd_loss(s, t, temp), s)
        norms.append(float(g.norm()))
    # without T**2 the gradient would shrink ~4x from T=4 to T=8; with it, far less
    assert 0.5 < norms[1] / norms[0] < 1.5


def test_distillation_loss_mixes_labels_and_teacher():
    torch.manual_seed(0)
    teacher = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    logits = torch.randn(8, 3)
    mix = DistillationLoss(teacher, weight=0.25, temperature=3.0)(logits, x, y)
    ce = nn.functional.cross_entropy(logits, y)
    kd = kd_loss(logits, teacher(x).detach(), 3.0)
    assert torch.allclose(mix, 0.75 * ce + 0.25 * kd)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_with_other_outputs_is_refused():
    loss = DistillationLoss(nn.Linear(5, 4), weight=0.5)
    with pytest.raises(CompactnnError, match=r"teacher's output \(8, 4\).*\(8, 3\)"):
        loss(torch.randn(8, 3), torch.randn(8, 5), torch.zeros(8, dtype=torch.long))
