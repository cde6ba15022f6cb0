"""Wanda on a model with layers it cannot prune (depthwise convs): one warning for all."""

import warnings

import pytest
import torch
from torch import nn

import compactnn


def _mobile_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_depthwise_convs_stay_dense_with_one_warning_naming_them(method):
    """sp50-wanda / sp50-sparsegpt printed one warning per depthwise conv (dozens on
    MobileNetV2); N:M groups its kept-dense layers in one line, and so do they now."""
    model = _mobile_like()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(model, f"sp50-{method}", calib_data=x, progress=False)
    said = [str(w.message) for w in rec if "groups>1" in str(w.message)]
    assert said == [
        f"{method}: kept dense (it prunes Linear and ungrouped Conv2d only): "
        "2 Conv2d with groups>1 (2, 6)"
    ]
    for i in (2, 6):  # untouched, and the reason recorded
        assert torch.equal(q[i].weight, model[i].weight)
        assert compactnn.info_of(q)["float_layers"][str(i)].startswith(f"{method} prunes Linear")
    if method == "sparsegpt":
        return  # its row counts follow the solver's mask; wanda's are exact
    for i in (0, 4, 10):  # the others: half of each output row zero (27 inputs: 14)
        rows = q[i].weight.detach().reshape(q[i].weight.shape[0], -1)
        half = round(rows.shape[1] / 2)
        assert torch.equal((rows == 0).sum(1), torch.full((rows.shape[0],), half))
