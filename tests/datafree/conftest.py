import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU x2, global pool, linear head: input (N, 1, 8, 8), 3 classes."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def tiny_teacher():
    torch.manual_seed(0)
    m = TinyCNN()
    m.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics of a "training set" unlike N(0, 1) noise
        for bn in (m.features[1], m.features[4]):
            bn.momentum = None  # cumulative average
        for _ in range(4):
            m(0.5 + 0.3 * torch.randn(64, 1, 8, 8, generator=gen).cumsum(3) / 3)
    return m.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
