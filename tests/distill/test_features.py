import pytest
import torch
from torch import nn

from compactnn.distill import FeatureDistiller
from compactnn.errors import CompactnnError


def _net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_feature_loss_is_mse_of_hooked_outputs():
    torch.manual_seed(0)
    student, teacher = _net(), _net()
    fd = FeatureDistiller(student, teacher, ["0", "2"])
    x = torch.randn(5, 4)
    s_out, t_out = student(x), teacher(x)
    expected = (
        nn.functional.mse_loss(student[0](x), teacher[0](x)) + nn.functional.mse_loss(s_out, t_out)
    ) / 2
    assert torch.allclose(fd.loss(), expected)
    fd.remove()
    student(x)
    assert not fd.outputs


def test_unknown_names_and_shape_mismatch_are_refused():
    student, teacher = _net(), _net()
    with pytest.raises(CompactnnError, match="no module 'nope'"):
        FeatureDistiller(student, teacher, ["nope"])
    fd = FeatureDistiller(student, teacher, {"0": "2"})
    x = torch.randn(3, 4)
    student(x)
    teacher(x)
    with pytest.raises(CompactnnError, match=r"\(3, 6\).*\(3, 2\)"):
        fd.loss()
