"""Values in field messages are shown cut: a huge or deeply shared value (a YAML alias
bomb built in Python) is never formatted whole."""

from __future__ import annotations

import time

import pytest

from compactnn.core.fields import check_keys, normalize, short_repr
from compactnn.errors import CompactnnError


def _bomb():
    value = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9  # 9**9 strings when formatted whole
    return value


def test_short_repr_is_cut_and_fast():
    start = time.perf_counter()
    text = short_repr(_bomb())
    assert time.perf_counter() - start < 0.1
    assert len(text) == 200 and text.endswith("...")
    assert short_repr("x" * 10_000).count("x") < 100
    assert short_repr([1, 2, 3]) == "[1, 2, 3]"


@pytest.mark.parametrize(
    "call",
    [
        lambda: normalize(_bomb(), int, "RTNConfig.weight.bits"),
        lambda: normalize(_bomb(), tuple[int, int], "x.pair"),
        lambda: check_keys(_bomb(), ("a",), "steps[0]"),
        lambda: check_keys({"k" * 100_000: 1}, ("a",), "steps[0]"),
    ],
)
def test_messages_show_a_cut_value(call):
    with pytest.raises(CompactnnError) as exc:
        call()
    assert len(str(exc.value)) < 400 and "..." in str(exc.value)


def test_small_values_are_shown_whole():
    with pytest.raises(CompactnnError) as exc:
        normalize("8", int, "RTNConfig.weight.bits")
    assert str(exc.value) == (
        "RTNConfig.weight.bits='8' (str) has the wrong type: expected an integer."
    )
