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


def _bn_net(width: int) -> nn.Sequential:
    """conv -> batch norm -> relu -> linear on (B, 1, 7, 7) inputs, in train mode."""
    layers = [nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 25, 3))


def test_sizing_the_heads_changes_neither_network():
    torch.manual_seed(0)
    student, teacher = _bn_net(2), _bn_net(4)
    student[1].eval()  # a mixed mode (a frozen batch norm in a training student) is kept
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (student, teacher)]
    modes = [[m.training for m in net.modules()] for net in (student, teacher)]
    x = torch.randn(8, 1, 7, 7) * 5 + 3  # far from the running statistics (0, 1)
    dcm = DCMDistiller(student, teacher, ["2"], ["1", "2"], x)
    assert len(dcm.heads) == 3
    for net, state, mode in zip((student, teacher), before, modes, strict=True):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
        assert [m.training for m in net.modules()] == mode
    dcm.remove()


def test_a_refused_distiller_leaves_no_hook_behind():
    student, teacher = Net(2), Net(4)
    with pytest.raises(CompactnnError, match="no module 'nope'"):
        DCMDistiller(student, teacher, ["features.1"], ["nope"], torch.randn(2, 1, 7, 7))
    assert not any(m._forward_hooks for m in student.modules())
