"""Activation calibration (quant/base.py): layers the calibration never reaches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig


class _Unused(nn.Module):
    """A model with a linear layer its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.spare = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x)


def test_a_layer_the_calibration_never_reaches_is_named():
    torch.manual_seed(0)
    model = _Unused().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unreached = r"never ran on the calibration data.*unknown: spare\."
    with pytest.raises(compactnn.CompactnnError, match=unreached):
        compactnn.compress(model, "w8a8", calib_data=torch.randn(4, 64), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # weight-only recipes need no activation ranges: the same model compresses
    q = compactnn.compress(model, "w4-g32", calib_data=torch.randn(4, 64), progress=False)
    assert q(torch.randn(2, 64)).shape == (2, 4)


def test_the_unreached_layer_can_be_excluded_as_the_error_says():
    import dataclasses

    from compactnn.core.modules import Targets
    from compactnn.recipe import resolve_recipe

    torch.manual_seed(0)
    recipe = resolve_recipe("w8a8")
    steps = tuple(
        dataclasses.replace(
            s, targets=dataclasses.replace(s.targets or Targets(), ignore=("spare",))
        )
        for s in recipe.steps
    )
    q = compactnn.compress(
        _Unused().eval(), dataclasses.replace(recipe, steps=steps), calib_data=torch.randn(4, 64),
        progress=False,
    )  # fmt: skip
    assert type(q.spare) is nn.Linear and type(q.fc) is not nn.Linear


def test_yaml_act_without_granularity_is_per_tensor():
    from compactnn.recipe import Recipe

    data = {"steps": [{"method": "rtn", "config": {"act": {"bits": 4}}}]}
    config = Recipe.from_dict(data).steps[0].config
    assert config.act.granularity == "tensor" and config.act.bits == 4
    assert config.weight == QuantConfig().weight  # other defaults untouched


def test_yaml_act_channel_granularity_is_refused_with_its_path():
    from compactnn.recipe import Recipe

    data = {"steps": [{"method": "rtn", "config": {"act": {"bits": 4, "granularity": "channel"}}}]}
    with pytest.raises(CompactnnError, match=r"steps\[0\]\.config\.act\.granularity"):
        Recipe.from_dict(data)


def test_python_act_without_granularity_is_per_tensor_like_yaml():
    from compactnn.core.spec import QuantSpec
    from compactnn.quant.rtn import RTNConfig

    config = RTNConfig(act=QuantSpec(bits=4, symmetric=False))
    assert config.act.granularity == "tensor" and config.act.bits == 4
    assert config.act == QuantConfig.from_dict({"act": {"bits": 4, "symmetric": False}}).act
    # weights keep their own default, per output channel
    assert RTNConfig(weight=QuantSpec(bits=4)).weight.granularity == "channel"
    assert QuantSpec(bits=4).granularity == "channel"
    # an explicit per-channel activation is still refused
    with pytest.raises(CompactnnError, match="per-tensor"):
        QuantConfig(act=QuantSpec(bits=4, granularity="channel"))
