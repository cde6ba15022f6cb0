"""Config versions of a recipe step: earlier field names are migrated only for earlier
versions, and a plugin's method too new to read names the plugin to upgrade
(:func:`compactnn.registry.check_config_version`, :func:`~compactnn.registry.check_field_names`)."""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import ClassVar

import pytest

from compactnn import registry
from compactnn.core.config import MethodConfig
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe


def _step(version: int | None, config: str) -> str:
    line = "" if version is None else f"    version: {version}\n"
    return f"steps:\n  - method: sparsegpt\n{line}    config: {config}\n"


def test_an_earlier_field_name_is_migrated_only_for_an_earlier_version():
    assert registry.get_method("sparsegpt").version == 2  # 2: blocksize renamed block_size
    for version in (1, None):  # absent: version 1
        step = Recipe.from_yaml(_step(version, "{blocksize: 64}")).steps[0]
        assert step.config.block_size == 64
    assert Recipe.from_yaml(_step(2, "{block_size: 64}")).steps[0].config.block_size == 64
    with pytest.raises(CompactnnError) as info:
        Recipe.from_yaml(_step(2, "{blocksize: 64}"))
    assert str(info.value) == (
        "steps[0].config: 'blocksize' is the earlier name of 'block_size' (method "
        "'sparsegpt'); this step says it is at the current config version 2, which reads "
        "only 'block_size': write 'block_size' (an earlier name is migrated only for a step "
        "of an earlier version)."
    )


@pytest.fixture
def plugin_method(monkeypatch):
    """A method registered by a plugin module ``f2_plugin_versions`` (config version 3)."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "METHODS_BY_CONFIG", dict(registry.METHODS_BY_CONFIG))
    module = types.ModuleType("f2_plugin_versions")
    monkeypatch.setitem(sys.modules, module.__name__, module)

    @dataclasses.dataclass(frozen=True)
    class PlugConfig(MethodConfig):
        config_version: ClassVar[int] = 3
        renamed_fields: ClassVar[dict[str, str]] = {"amount": "sparsity"}
        sparsity: float = 0.5

    def handler(model, targets, config, ctx):
        return model

    handler.__module__ = module.__name__
    registry.register("f2_plug", PlugConfig, "a plugin method")(handler)
    return registry.get_method("f2_plug")


def test_a_plugin_config_too_new_names_the_plugin_to_upgrade(plugin_method):
    with pytest.raises(CompactnnError) as info:
        registry.check_config_version(plugin_method, 4)
    message = str(info.value)
    assert "upgrade the plugin 'f2_plugin_versions' (not compactnn)" in message
    assert "upgrade compactnn" not in message
    with pytest.raises(CompactnnError, match="the plugin 'f2_plugin_versions' defining it"):
        registry.check_config_version(plugin_method, 0)
    with pytest.raises(CompactnnError, match="; upgrade compactnn to load it"):
        registry.check_config_version(registry.get_method("sparsegpt"), 3)


def test_a_plugins_renamed_field_at_its_current_version_is_refused(plugin_method):
    text = "steps:\n  - method: f2_plug\n    version: {}\n    config: {{amount: 0.3}}\n"
    assert Recipe.from_yaml(text.format(2)).steps[0].config.sparsity == 0.3
    with pytest.raises(CompactnnError, match="write 'sparsity'"):
        Recipe.from_yaml(text.format(3))
