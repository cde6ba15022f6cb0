"""The range rules every method config shares, by field name (core/config_checks.py)."""

from __future__ import annotations

import math

import pytest

from compactnn import registry
from compactnn.core.config_checks import (
    MAX_COUNT,
    check_config_ranges,
    check_ranges,
    located,
    rule_for,
)
from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig


def test_every_default_config_keeps_the_rules():
    """The table refuses no default of any registered method (nothing valid changes)."""
    registry.load_builtins()
    for entry in registry.METHODS.values():
        check_config_ranges(entry.config_cls())


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("lr", -1, "steps[0].config.lr=-1 must be > 0 (a learning rate, e.g. 0.001)."),
        ("lr", 0.0, "steps[0].config.lr=0.0 must be > 0"),
        ("lr", math.nan, "steps[0].config.lr=nan must be a finite number (a learning rate"),
        ("finetune_steps", -5, "steps[0].config.finetune_steps=-5 must be >= 0"),
        ("finetune_steps", 10**12, "finetune_steps=1000000000000 must be at most 10,000,000"),
    ],
)
def test_channel_pruning_values_no_method_can_use_are_refused_with_the_path(field, value, needle):
    """ChannelConfig took lr=-1 (torch's Adam crashed later with a traceback when
    finetune_steps > 0), finetune_steps=-5 (silently 0) and 1e12 (ran for ever)."""
    with pytest.raises(CompactnnError) as err:
        check_ranges(ChannelConfig, {"ratio": 0.3, field: value}, "steps[0].config")
    assert needle in str(err.value)


def test_values_that_were_valid_stay_valid():
    check_ranges(ChannelConfig, {"finetune_steps": 0, "lr": 1e-5}, "c")  # 0 steps: no tuning
    check_ranges(ChannelConfig, {"finetune_steps": MAX_COUNT}, "c")
    registry.load_builtins()
    lsq = registry.METHODS["lsq"].config_cls
    check_ranges(lsq, {"lr_quant": 0.0, "distill": 0.0}, "c")  # 0 freezes / turns off


@pytest.mark.parametrize(
    ("name", "low"),
    [("lr", 0.0), ("act_lr", 0.0), ("irnet_lr", 0.0), ("temperature", 0.0), ("epochs", 0)],
)
def test_rules_go_by_the_field_name(name, low):
    rule = rule_for(name)
    assert rule is not None and rule.low == low
    assert rule.problem(low - 1) is not None


def test_a_config_object_is_checked_under_its_class_name():
    with pytest.raises(CompactnnError, match=r"^ChannelConfig\.lr=-1\.0 must be > 0"):
        check_config_ranges(ChannelConfig(lr=-1.0))


@pytest.mark.parametrize(
    ("message", "data", "expected"),
    [
        (
            "bits=-4 is out of range: compactnn quantizes to 1..8 bits.",
            {"weight": {"bits": -4}},
            "steps[0].config.weight.bits=-4 is out of range: compactnn quantizes to 1..8 bits.",
        ),
        (  # two fields of that name: the one whose value the message quotes
            "bits=-4 is out of range.",
            {"weight": {"bits": 4}, "act": {"bits": -4}},
            "steps[0].config.act.bits=-4 is out of range.",
        ),
        (
            "NMConfig.finetune_steps=-1 must be >= 0.",
            {"finetune_steps": -1},
            "steps[0].config.finetune_steps=-1 must be >= 0.",
        ),
        (  # no field named: the path in front
            "lr must be > 0, lr_quant >= 0 and batch_size >= 1.",
            {"lr": 0},
            "steps[0].config: lr must be > 0, lr_quant >= 0 and batch_size >= 1.",
        ),
    ],
)
def test_a_configs_own_message_gets_the_key_path(message, data, expected):
    assert located(message, data, "steps[0].config") == expected
