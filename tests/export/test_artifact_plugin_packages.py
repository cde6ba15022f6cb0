"""save refuses a plugin's layer class that load cannot rebuild wherever the plugin defines
it (another module of its package than the handler's, the module of the model's own class)
and wherever it sits (inside nn.Sequential): compress records the skeleton's classes before
any handler runs (:func:`compactnn.export.save_checks.note_new_classes`)."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from torch import nn

import compactnn
from compactnn import registry
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, Step

LAYERS = """
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        return self.inner(x) * self.gain
"""

METHOD = """
import dataclasses

from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.registry import register
from f2nest.layers import Scaled


@dataclasses.dataclass(frozen=True)
class NestConfig(MethodConfig):
    pass


@register("f2nest_wrap", NestConfig, "wrap every Linear, at any depth")
def apply(model, targets, config, ctx):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Scaled(child))
    ctx.extra["f2nest"] = [n for n, m in model.named_modules() if isinstance(m, Scaled)]
    return model


class Net(nn.Module):  # a model class of the plugin's own method module
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))

    def forward(self, x):
        return self.body(x)
"""

HOOKS = """
from compactnn.registry import register_artifact_hook
from f2nest.layers import Scaled


@register_artifact_hook("before_layers")
def rebuild(model, extra):
    for name in extra.get("f2nest", []):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, Scaled(model.get_submodule(name)))
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Package ``f2nest``: its layer class, method and (importable on demand) artifact hook
    in three modules; registered in scratch registry tables."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))
    hooks = {k: list(v) for k, v in registry.ARTIFACT_HOOKS.items()}
    monkeypatch.setattr(registry, "ARTIFACT_HOOKS", hooks)
    package = tmp_path / "plugins" / "f2nest"
    package.mkdir(parents=True)
    for name, text in (("__init__", ""), ("layers", LAYERS), ("method", METHOD), ("hooks", HOOKS)):
        (package / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(package.parent))
    for name in ("f2nest", "f2nest.layers", "f2nest.method", "f2nest.hooks"):
        monkeypatch.delitem(importlib.sys.modules, name, raising=False)
    return importlib.import_module("f2nest.method")


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3))).eval()


def _compress(method, model: nn.Module) -> nn.Module:
    recipe = Recipe("wrap", (Step("f2nest_wrap", method.NestConfig()),))
    return compactnn.compress(model, recipe, progress=False)


def test_a_plugin_class_of_another_module_in_nn_sequential_is_refused(plugin, tmp_path):
    """Before: saved (the class is not in the handler's module), then never loaded:
    "tensor '0.inner.weight' of the artifact is not in the skeleton"."""
    q = _compress(plugin, _sequential())
    with pytest.raises(CompactnnError) as info:
        compactnn.save(q, tmp_path / "a")
    assert str(info.value).startswith(
        "cannot save: '0' is a Scaled (f2nest.layers), a class method 'f2nest_wrap' "
        "(f2nest.method) put in the model, which load cannot rebuild"
    )
    assert "register_artifact_hook" in str(info.value)
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_a_plugin_class_beside_the_models_own_class_is_refused(plugin, tmp_path):
    """Before: the classes of the model class's module were taken for the skeleton's, so
    this one saved and never loaded."""
    torch.manual_seed(0)
    q = _compress(plugin, plugin.Net().eval())
    with pytest.raises(CompactnnError, match=r"'body\.0' is a Scaled \(f2nest\.layers\)"):
        compactnn.save(q, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_with_the_plugins_artifact_hook_it_saves_and_loads_exactly(plugin, tmp_path):
    importlib.import_module("f2nest.hooks")
    q = _compress(plugin, _sequential())
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=_sequential())
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert type(loaded[2][0]).__name__ == "Scaled"
        ref = _sequential()
        expected = 2.0 * ref[2][0](torch.relu(2.0 * ref[0](x)))
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_compressing_again_keeps_the_skeletons_classes(plugin, tmp_path):
    """A second compress of the compressed model still knows which classes the plugin
    made (not taken for the skeleton's)."""
    q = _compress(plugin, _sequential())
    again = compactnn.compress(q, "w8a8", calib_data=torch.randn(16, 4), progress=False)
    with pytest.raises(CompactnnError, match="'0' is a Scaled"):
        compactnn.save(again, tmp_path / "a")
