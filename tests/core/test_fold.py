import copy

import pytest
import torch
from torch import nn

from compactnn.core.fold import find_conv_bn_pairs, fold_batchnorm


def test_folding_preserves_outputs_and_removes_bn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    m.eval()
    x = torch.randn(2, 3, 9, 9)
    ref = m(x)
    assert find_conv_bn_pairs(m) == [("0", "1"), ("3", "4")]
    folded = fold_batchnorm(m)
    assert folded == ["1", "4"]
    assert isinstance(m[1], nn.Identity) and m[0].bias is not None
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_conv_with_two_consumers_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert find_conv_bn_pairs(Net().eval()) == []


class _Twice(nn.Module):
    """A forward that runs its conv -> BN block twice (features for two heads)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1)), self.features(x)


def test_a_block_called_twice_is_folded_once_and_computes_the_same():
    torch.manual_seed(0)
    model = _Twice().eval()
    model.features[1].running_mean.uniform_(-1, 1)
    model.features[1].running_var.uniform_(0.5, 2)
    assert find_conv_bn_pairs(model) == [("features.0", "features.1")]
    x = torch.randn(2, 1, 8, 8)
    want = model(x)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == ["features.1"]
    for a, b in zip(folded(x), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_hooked_conv_whose_bn_is_folded_is_warned():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    model[0].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=r"hooks on '0' now see its output with '1' folded in"):
        fold_batchnorm(model)
