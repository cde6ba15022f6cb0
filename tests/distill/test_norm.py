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


class Deep(nn.Module):
    """Two stages; the second's map is averaged into the head."""

    def __init__(self, width: int, stride: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=stride), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_norm_loss_on_maps_by_hand():
    e = torch.arange(8.0).view(1, 4, 1, 2)  # N = 2 segments of C_t = 2 channels, 1x2 maps
    t = torch.ones(1, 2, 1, 2)
    ref = 2 * ((torch.arange(8.0) - 1) ** 2).mean()
    assert float(norm_loss(e, t, 2)) == pytest.approx(float(ref))
    with pytest.raises(CompactnnError, match="size"):
        norm_loss(e, torch.ones(1, 2, 2, 1), 2)


def test_map_sft_with_batchnorm_merges_exactly_and_pools_the_teacher():
    torch.manual_seed(0)
    student, teacher = Deep(3, stride=2).train(), Deep(5).eval()
    x, y = torch.randn(8, 1, 9, 9), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    norm = NormDistiller(
        student, teacher, n=2, student_feature="features", teacher_feature="features", probe=x
    )
    assert isinstance(norm.expand[1], nn.BatchNorm2d) and norm.expand[0].out_channels == 10
    opt = torch.optim.Adam([*student.parameters(), *norm.parameters()], lr=0.05)
    for _ in range(5):
        logits = student(x)
        teacher(x)
        # teacher map 7x7, student 4x4: the loss matches the 4x4 max-pooled teacher map
        f_t = F.adaptive_max_pool2d(teacher.features(x), 4).detach()
        ref = 2 * F.mse_loss(norm._expanded, f_t.repeat(1, 2, 1, 1))
        got = norm.loss()
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        opt.zero_grad()
        (got + F.cross_entropy(logits, y)).backward()
        opt.step()
    assert norm.contract[1].weight.abs().sum() > 0
    student.eval(), norm.eval()
    with torch.no_grad():
        wrapped = student(x)
        merged = norm.merge()
        out = merged.eval()(x)
    assert torch.allclose(out, wrapped, atol=1e-5)
    assert [type(m) for m in merged.modules()] == [type(m) for m in Deep(3).modules()]


def test_map_errors():
    with pytest.raises(CompactnnError, match="give both"):
        NormDistiller(Deep(2), Deep(2), student_feature="features")
    with pytest.raises(CompactnnError, match="probe"):
        NormDistiller(Deep(2), Deep(2), student_feature="features", teacher_feature="features")
    with pytest.raises(CompactnnError, match="map"):
        NormDistiller(
            Net(2),
            Net(2),
            student_feature="head",
            teacher_feature="head",
            probe=torch.ones(2, 1, 5, 5),
        )


def test_merge_refuses_a_map_that_is_not_average_pooled():
    class MaxPooled(Deep):
        def forward(self, x):
            return self.head(self.features(x).amax((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    student = MaxPooled(2)
    norm = NormDistiller(
        student, Deep(3), student_feature="features", teacher_feature="features", probe=x
    )
    with torch.no_grad():
        norm.contract[1].weight.fill_(1.0)
        norm.contract[1].bias.fill_(0.5)
    student(x)
    with pytest.raises(CompactnnError, match="global average pooling"):
        norm.merge()
