"""Reading an artifact: a method this process has not registered is named, with the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import compactnn
from compactnn import registry
from compactnn.errors import ArtifactError
from compactnn.quant.rtn import RTNConfig, apply_rtn
from compactnn.recipe import Recipe, Step


@dataclasses.dataclass(frozen=True)
class ReaderPluginConfig(RTNConfig):
    """A third-party copy of rtn."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_an_artifact_of_an_unregistered_method_names_it_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))
    registry.register("reader_plugin", ReaderPluginConfig)(apply_rtn)
    model = _net()
    recipe = Recipe("rp", [Step("reader_plugin", ReaderPluginConfig.from_short(4, None, None))])
    qmodel = compactnn.compress(model, recipe, progress=False)
    compactnn.save(qmodel, tmp_path / "art")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    expected = qmodel(x)
    entry = registry.METHODS.pop("reader_plugin")  # a process without the plugin
    del registry.METHODS_BY_CONFIG[ReaderPluginConfig]
    with pytest.raises(ArtifactError) as info:
        compactnn.load(tmp_path / "art", model=_net())
    message = str(info.value)
    assert "made with method 'reader_plugin', which is not registered" in message
    assert "before compactnn.load, or --plugin MODULE" in message
    assert "not a valid recipe" not in message
    registry.METHODS["reader_plugin"] = entry  # the plugin imported: it loads, bit-exact
    registry.METHODS_BY_CONFIG[ReaderPluginConfig] = entry
    assert torch.equal(compactnn.load(tmp_path / "art", model=_net())(x), expected)
