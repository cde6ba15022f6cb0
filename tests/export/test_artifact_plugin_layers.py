"""save refuses layers of a third-party method's own classes that load cannot rebuild (no
artifact hook): they would come back as the skeleton's plain layer or never load."""

import dataclasses

import pytest
import torch
from torch import nn

import compactnn
from compactnn import registry
from compactnn.core.config import MethodConfig
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, Step


class ScaledLinear(nn.Linear):
    """A Linear whose output is multiplied by a plain attribute (state outside state_dict)."""

    def __init__(self, lin: nn.Linear, alpha: float) -> None:
        super().__init__(lin.in_features, lin.out_features)
        self.load_state_dict(lin.state_dict())
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.alpha


class GainLinear(nn.Linear):
    """A Linear with an extra buffer (a tensor no skeleton has)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__(lin.in_features, lin.out_features)
        self.load_state_dict(lin.state_dict())
        self.register_buffer("gain", torch.full((lin.out_features,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


@dataclasses.dataclass(frozen=True)
class SwapConfig(MethodConfig):
    kind: str = "attr"


def swap_handler(model, targets, config, ctx):
    """Replace layer '0' by a class of this module; 'weights' only rescales the weights."""
    if config.kind == "weights":
        with torch.no_grad():
            model[0].weight.mul_(0.5)
    elif config.kind == "attr":
        model[0] = ScaledLinear(model[0], 2.0)
        ctx.extra["swap_alphas"] = {"0": 2.0}
    else:
        model[0] = GainLinear(model[0])
    return model


def rebuild_scaled(model, extra):
    """The artifact hook that rebuilds the ScaledLinear layers from the header."""
    for name, alpha in extra.get("swap_alphas", {}).items():
        setattr(model, name, ScaledLinear(model.get_submodule(name), float(alpha)))


@pytest.fixture
def plugin(monkeypatch):
    """Method 'swap_m' (handler in this module) registered in scratch registry tables."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))
    hooks = {k: list(v) for k, v in registry.ARTIFACT_HOOKS.items()}
    monkeypatch.setattr(registry, "ARTIFACT_HOOKS", hooks)
    registry.register("swap_m", SwapConfig, "test plugin")(swap_handler)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _compressed(kind: str) -> nn.Module:
    recipe = Recipe("s", [Step("swap_m", SwapConfig(kind))])
    return compactnn.compress(_net(), recipe, progress=False)


@pytest.mark.parametrize(("kind", "cls"), [("attr", "ScaledLinear"), ("buf", "GainLinear")])
def test_save_refuses_a_plugin_layer_class_load_cannot_rebuild(plugin, kind, cls, tmp_path):
    """Before: 'attr' saved and loaded as a plain Linear (other outputs, no error); 'buf'
    saved an artifact that never loads. Now save refuses, naming layer, class, method, fix."""
    q = _compressed(kind)
    with pytest.raises(CompactnnError, match=rf"'0' is a {cls}.*'swap_m'") as e:
        compactnn.save(q, tmp_path / "a")
    assert "register_artifact_hook" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_plugin_layers_with_an_artifact_hook_and_weight_only_plugins_still_save(plugin, tmp_path):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    q = _compressed("weights")  # keeps the skeleton's classes: saves and reloads exactly
    compactnn.save(q, tmp_path / "w")
    with torch.no_grad():
        assert torch.equal(compactnn.load(tmp_path / "w", model=_net())(x), q(x))

    registry.register_artifact_hook("before_layers")(rebuild_scaled)  # the documented fix
    q = _compressed("attr")
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=_net())
    assert type(loaded[0]) is ScaledLinear
    with torch.no_grad():  # reference: the float layer scaled by alpha, independently
        net = _net()
        ref = net[2](torch.relu(2.0 * net[0](x)))
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
