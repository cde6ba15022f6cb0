"""Layers a binary block cannot wrap are refused all at once, each named with why."""

from __future__ import annotations

import re

import pytest
from torch import nn

from compactnn.engines.binary import check_binary_layer
from compactnn.engines.binary_checks import check_binary_layers
from compactnn.errors import CompactnnError


def test_every_unsupported_layer_is_named_in_one_message():
    layers = {
        "c1": nn.Conv2d(1, 2, 3, padding=1),
        "c2": nn.Conv1d(2, 2, 3),
        "c3": nn.Conv1d(2, 2, 3),
        "p": nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        "fc": nn.Linear(2, 2),
    }
    with pytest.raises(CompactnnError) as info:
        check_binary_layers(layers)
    msg = str(info.value)
    assert msg.startswith("3 layers cannot take 1-bit activations: 'c2' (Conv1d), 'c3' (Conv1d)")
    assert "'p' (padding ((1, 1), reflect)): the padding must be explicit zeros" in msg
    assert "Leave them in float: ignore=['c2', 'c3', 'p'] (compress/train)" in msg
    assert "'c1'" not in msg and "'fc'" not in msg
    assert "\n" not in msg


def test_one_layer_keeps_the_single_layer_wording():
    with pytest.raises(CompactnnError) as info:
        check_binary_layer("m", nn.Conv1d(2, 2, 3))
    assert re.fullmatch(
        r"layer 'm' \(Conv1d\) cannot take 1-bit activations: binary blocks wrap Conv2d and "
        r"Linear layers\. Leave it in float: ignore=\['m'\] \(compress/train\) "
        r"or the step's targets\.ignore; or keep its activations at 8 bits\.",
        str(info.value),
    )


def test_supported_layers_pass():
    check_binary_layers({"c": nn.Conv2d(2, 2, 3, padding=1), "fc": nn.Linear(2, 2)})
    check_binary_layers({})
