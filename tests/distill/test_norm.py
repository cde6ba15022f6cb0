import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compactnn.distill.norm import NormDistiller, norm_loss
from compactnn.errors import CompactnnError


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_norm_loss_by_hand():
    e = torch.tensor([[1.0, 2.0, 3.0, 5.0]])  # N = 2 segments of C_t = 2
    t = torch.tensor([[1.0, 1.0]])
    # squared errors 0, 1, 4, 16 -> mean 5.25, times N
    assert float(norm_loss(e, t, 2)) == pytest.approx(10.5)
    with pytest.raises(CompactnnError, match="N \\* C_t"):
        norm_loss(e, t, 3)


def test_sft_trains_and_merges_exactly():
    torch.manual_seed(0)
    student, teacher = Net(3).eval(), Net(5).eval()
    x, y = torch.randn(6, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = student(x)
    norm = NormDistiller(student, teacher, n=4)
    assert norm.expand.out_features == 20 and norm.contract.out_features == 3
    assert torch.allclose(student(x), plain)  # the SFT starts as the identity
    opt = torch.optim.SGD([*student.parameters(), *norm.parameters()], lr=0.1)
    for _ in range(3):
        logits = student(x)
        teacher(x)
        loss = norm.loss() + F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert norm.contract.weight.abs().sum() > 0  # the SFT is no longer the identity
    with torch.no_grad():
        wrapped = student(x)
        merged = norm.merge()
        out = merged(x)
    assert not torch.allclose(wrapped, plain, atol=1e-3)
    assert torch.allclose(out, wrapped, atol=1e-5)
    assert type(merged.head) is nn.Linear and merged.head.weight.shape == (3, 3)
    norm.remove()
    with torch.no_grad():
        assert not torch.allclose(student(x), wrapped, atol=1e-3)  # hooks gone


def test_errors():
    with pytest.raises(CompactnnError, match=r"nn\.Linear called 'fc'"):
        NormDistiller(Net(2), Net(2), student_head="fc")
    with pytest.raises(CompactnnError, match="n=0"):
        NormDistiller(Net(2), Net(2), n=0)
    norm = NormDistiller(Net(2), Net(2))
    with pytest.raises(CompactnnError, match="run the student"):
        norm.loss()
