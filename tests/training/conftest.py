import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> bn -> relu, conv (stride 2) -> bn -> relu, conv, pool, linear: 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: a bright quadrant of an 8x8 image, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    for c in range(4):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 1.0
    return x, y


@pytest.fixture(scope="session")
def tiny():
    torch.set_num_threads(1)
    """A float TinyNet trained briefly on the synthetic data, and that data."""
    torch.manual_seed(0)
    x, y = make_data(256, 0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, (x, y), make_data(128, 1)
