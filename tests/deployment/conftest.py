"""Small CNNs with the structures deploy must cover: residual add, depthwise and grouped
convolutions, concatenation, max and average pooling, a linear head; a net with a Conv1d
(a layer deploy keeps in float); ``steps``, an output difference in output steps."""

import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, in_ch: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.act6 = nn.ReLU6()
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.pool = nn.MaxPool2d(2)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.pw(self.act6(self.dw(x)))
        x = nn.functional.relu(x + y)  # residual add, ReLU after it
        x = self.pool(x)
        x = torch.cat([torch.relu(self.branch_a(x)), self.branch_b(x).relu()], dim=1)
        return self.fc(torch.flatten(self.avg(x), 1))


def make_net(in_ch: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = SmallNet(in_ch)
    net.train()
    with torch.no_grad():  # realistic batch-norm statistics
        for _ in range(3):
            net(torch.randn(16, in_ch, 16, 16))
    return net.eval()


@pytest.fixture(scope="module")
def qnet():
    import compactnn

    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    return compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False), calib


def steps(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Independent re-computation of the difference in steps of the output scale."""
    step = (ref.max() - ref.min()).item() / 255
    return (ref - out).abs().max().item() / step


class WithConv1d(nn.Module):
    """A Conv1d between a Conv2d and a Linear: deploy has no int8 kernel for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(2)  # (N, 8, H*W)
        return self.fc(self.seq(x).mean(-1))
