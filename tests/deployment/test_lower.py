"""Lowering to the int8 graph (``deployment/lower.py``): sizes a reshape reads from its own
tensor (``x.view(x.size(0), -1)``, ShuffleNet's channel shuffle) stay integers while the
tensor travels as uint8 codes."""

import pytest
import torch
from torch import nn

import compactnn
from tests.deployment.conftest import steps


class Flattened(nn.Module):
    """conv -> ReLU -> max-pool -> a reshape of the codes (spelled ``how``) -> linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.pool, self.fc = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Linear(128, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        if self.how == "size":
            x = x.view(x.size(0), -1)
        elif self.how == "shape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.view(-1, 128)  # constant sizes: the reference spelling
        return self.fc(x)


class Shuffled(nn.Module):
    """Two convolutions with a channel shuffle between them (torchvision ShuffleNetV2's),
    sizes read from the tensor (``"size"``) or written as constants (the reference)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        if self.how == "size":
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        else:
            x = x.view(-1, 2, 4, 8, 8).transpose(1, 2).contiguous().view(-1, 8, 8, 8)
        return self.b(x).mean((2, 3))


def _deploy(cls, how: str, state: dict, x: torch.Tensor):
    net = cls(how).eval()
    net.load_state_dict(state)
    q = compactnn.compress(net, "w8a8", calib_data=x, progress=False)
    return q, compactnn.deploy(q, "onednn", example=x[:4])


@pytest.mark.parametrize(
    ("cls", "spellings"), [(Flattened, ("size", "shape")), (Shuffled, ("size",))]
)
def test_sizes_read_from_the_tensor_deploy_like_constant_sizes(cls, spellings):
    torch.manual_seed(0)
    state = cls("const").state_dict()
    x, fresh = torch.randn(16, 3, 8, 8), torch.randn(6, 3, 8, 8)
    q_ref, ref = _deploy(cls, "const", state, x)
    for how in spellings:
        q, deployed = _deploy(cls, how, state, x)
        assert deployed.verification.passed
        with torch.no_grad():
            assert torch.equal(q(fresh), q_ref(fresh))  # the same simulated model
            assert torch.equal(deployed(fresh), ref(fresh))  # the same kernels, other batch size
            assert steps(q(fresh), deployed(fresh)) <= 1.0
