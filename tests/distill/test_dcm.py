import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.distill.dcm import DCMDistiller, dcm_loss
from compactnn.errors import CompactnnError


def _kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per sample, written out."""
    p, q = F.softmax(p_logits, 1), F.softmax(q_logits, 1)
    return (p * (p.log() - q.log())).sum(1).mean()


def test_dcm_loss_against_the_written_formula():
    torch.manual_seed(0)
    s = [torch.randn(4, 3), torch.randn(4, 3)]
    t = [torch.randn(4, 3)]
    y = torch.tensor([0, 1, 2, 1])
    ref = sum(F.cross_entropy(h, y) for h in s + t)
    ref = ref + sum(_kl(tj, si) + _kl(si, tj) for si in s for tj in t)
    assert float(dcm_loss(s, t, y)) == pytest.approx(float(ref), rel=1e-5)
    # temperature: KL on softened logits, times T^2
    ref2 = sum(F.cross_entropy(h, y) for h in s + t)
    ref2 = ref2 + 4 * sum(_kl(tj / 2, si / 2) + _kl(si / 2, tj / 2) for si in s for tj in t)
    assert float(dcm_loss(s, t, y, temperature=2.0)) == pytest.approx(float(ref2), rel=1e-5)
    zero = [torch.zeros(2, 3)]
    assert float(dcm_loss(zero, zero, torch.tensor([0, 1]))) == pytest.approx(2 * math.log(3))


def test_targets_are_detached():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    dcm_loss([s], [t], y).backward()
    # d/ds of CE(s) + KL(sg t || s) + KL(sg s || t): only the s-side terms
    s2, t2 = s.detach().clone().requires_grad_(True), t.detach()
    (F.cross_entropy(s2, y) + _kl(t2, s2)).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3), nn.ReLU(), nn.Conv2d(width, 2 * width, 3), nn.ReLU()
        )
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_distiller_heads_and_gradients():
    torch.manual_seed(0)
    student, teacher = Net(2), Net(4)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(5, 1, 7, 7), torch.tensor([0, 1, 2, 0, 1])
    dcm = DCMDistiller(student, teacher, ["features.1"], ["features.1", "features.3"], x[:2])
    assert len(dcm.heads) == 3
    loss = dcm.loss(student(x), teacher(x), y)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in dcm.heads.parameters())
    s_aux = dcm.heads["student:features_1"]
    assert s_aux.fc.in_features == 2
    dcm.remove()
    student(x)
    assert not dcm.outputs  # no hooks left
    with pytest.raises(CompactnnError, match="no module 'nope'"):
        DCMDistiller(student, teacher, ["nope"], [], x[:2])
    with pytest.raises(CompactnnError, match="did not run"):
        DCMDistiller(student, teacher, ["features.1"], [], x[:2]).loss(
            torch.zeros(5, 3), torch.zeros(5, 3), y
        )
