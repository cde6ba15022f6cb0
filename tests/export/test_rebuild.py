"""Rebuilding a compressed model on its float skeleton: the skeleton's module versions
(state-dict ``_metadata``) reach the modules that read them while loading."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import compactnn


class Versioned(nn.Module):
    """Reads its version from ``local_metadata`` while loading, as torchvision's MNASNet."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def _versioned_net() -> nn.Module:
    return nn.Sequential(Versioned(), nn.Linear(5, 3))


def test_a_module_reading_its_version_while_loading_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = _versioned_net().eval(), torch.randn(16, 6)
    q = compactnn.compress(model, "w8a8", calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=_versioned_net())  # was ArtifactError
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert torch.equal(loaded[0].fc.weight_codes, q[0].fc.weight_codes)


def test_mnasnet_round_trips(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    make = lambda: torchvision.models.mnasnet0_5(weights=None, num_classes=4)  # noqa: E731
    x = torch.randn(2, 3, 32, 32)
    q = compactnn.compress(make().eval(), "w8", progress=False)
    compactnn.save(q, tmp_path / "q")
    loaded = compactnn.load(tmp_path / "q", model=make())  # was "version should be set ..."
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_a_module_reading_its_version_loads_straight_onto_kernels(tmp_path):
    """load(kernels=True) fills the skeleton's meta tensors with its own load_state_dict:
    the modules' versions must reach it too."""
    torch.manual_seed(0)
    model = nn.Sequential(Versioned(), nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    q = compactnn.compress(model, "w8", progress=False)
    compactnn.save(q, tmp_path / "q")
    skeleton = nn.Sequential(Versioned(), nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64))
    fast = compactnn.load(tmp_path / "q", model=skeleton, kernels=True)  # was ValueError
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), compactnn.to_kernels(q)(x), atol=0, rtol=0)
