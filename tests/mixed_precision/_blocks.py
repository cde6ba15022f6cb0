"""A tiny residual CNN shared by the pruning tests of the search."""

import torch
from torch import nn


class Block(nn.Module):
    """stem -> (a -> b) + residual -> head: ``stem`` and ``b`` write into one stream, so only
    ``a``'s outputs can be pruned alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x.flatten(1))
