"""Tiny models and helpers shared by the post-training quantization tests."""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    """conv -> relu -> conv, plus the identity, then relu: a residual block of two layers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.relu(self.conv1(x))) + x)


class TinyResNet(nn.Module):
    """stem conv -> residual block -> pool -> linear; inputs ``(N, 3, 8, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = ResBlock(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    m = TinyResNet()
    with torch.no_grad():  # non-trivial batch-norm statistics so folding matters
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    ).eval()


def images(n: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def vectors(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def output_mse(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).pow(2).mean())
