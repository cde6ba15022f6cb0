"""Small CNNs with the structures deploy must cover: residual add, depthwise and grouped
convolutions, concatenation, max and average pooling, a linear head."""

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
