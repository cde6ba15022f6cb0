"""A tiny CNN and its inputs, shared by the report tests."""

import torch
from torch import nn

X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)
    ).eval()
