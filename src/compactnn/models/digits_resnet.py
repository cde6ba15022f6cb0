"""``digits-resnet``: a narrow ResNet on the 8x8 digits, where low-bit quantization hurts.

Architecture (input ``(N, 1, 8, 8)``): a conv3x3-BN-ReLU stem with 8 channels, three residual
stages of one basic block each (8, 16, 32 channels; stride 1, 2, 2: 8x8 -> 4x4 -> 2x2; a
1x1 conv-BN shortcut where the shape changes), global average pooling and a linear head.
With so few channels every weight matters, so 4- and 2-bit grids cost visible accuracy.

Training: 20 epochs of AdamW (one-cycle) on the 1,433 training digits with small random
warps (about 8 s on one core); cached like ``mnist-cnn``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compactnn.data import digits
from compactnn.models import lazy
from compactnn.models.fit import FitConfig
from compactnn.models.reference import Reference

NAME = "digits-resnet"
# the cache key's stand-in for the digits (split_desc of load_digits8(), checked on use)
DATA_FINGERPRINT = "(1433, 1, 8, 8)/(364, 1, 8, 8)/0.305328/0.375490"
STAGES = ((8, 1), (16, 2), (32, 2))  # (channels, stride)
FIT = FitConfig(epochs=20, max_shift=0.5 / 8, max_rotation=0.1, max_scale=0.05)


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with an identity (or 1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """The ``digits-resnet`` architecture."""

    input_shape = (1, 8, 8)  # one example, as --data data-free generates it

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        c0 = STAGES[0][0]
        self.stem = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        )
        blocks, c_in = [], c0
        for c_out, stride in STAGES:
            blocks.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (N, 32, 2, 2)
        return self.head(torch.flatten(self.pool(x), 1))  # (N, 10)


def build_digits_resnet(
    *, progress: bool = True, seed: int = 0, fit: FitConfig | None = None
) -> Reference:
    """The trained ``digits-resnet`` reference (trained on first use, then cached).

    Calibration: the first 512 training digits in batches of 64; quality: top-1 percent on
    the 364 test digits.

    Args:
        progress: show a progress bar while training.
        seed: initial weights, shuffling and augmentation; part of the cache key.
        fit: training settings (part of the cache key); None: the defaults (20 epochs).
    """
    return lazy.lazy_image_reference(
        NAME,
        DigitsResNet,
        lambda: lazy.read_split(digits.load_digits8, NAME, "the 8x8 digits scikit-learn ships"),
        DATA_FINGERPRINT,
        [sys.modules[__name__], digits],
        seed=seed,
        cfg=fit or FIT,
        progress=progress,
    )
