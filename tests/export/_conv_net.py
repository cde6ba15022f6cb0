"""A small seeded CNN on 3x6x6 inputs (two convolutions, two linears) for ONNX export tests."""

import torch
from torch import nn


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()  # fmt: skip
