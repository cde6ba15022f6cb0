"""A network that amplifies one-code rounding flips, shared by the verification tests."""

from __future__ import annotations

import torch
from torch import nn


def deep_bn_net(depth: int = 28, channels: int = 16):
    """A random conv-BN-ReLU stack (batch norms set to the statistics of its input) quantized
    w8a8, and its input: 16 images of 16x16 with four distinct values. Such stacks amplify a
    one-code flip from layer to layer (measured: 7.1 steps at the output from +-4 ulps before
    each quantizer)."""
    import compactnn

    x = torch.randint(0, 4, (16, 1, 16, 16), generator=torch.Generator().manual_seed(0)) / 4
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels, momentum=None)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
        layers += [nn.BatchNorm2d(channels, momentum=None)]
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    model = nn.Sequential(*layers).train()
    with torch.no_grad():
        model(x)  # batch-norm statistics of x (cumulative average)
    return compactnn.compress(model.eval(), "w8a8", calib_data=x, progress=False).eval(), x
