"""An unknown recipe short name: one line, with the reason where one is known (a signed
number, a suffix the family does not take) and the nearest valid names."""

from __future__ import annotations

import pytest

from compactnn.errors import CompactnnError
from compactnn.recipe import resolve_recipe

TAIL = (
    " A recipe is a YAML file or a short name such as w8a8, w4a8, sp50, ch30 or nm2:4 "
    "(`compactnn recipes` lists every form)."
)


def _error(name: str) -> str:
    with pytest.raises(CompactnnError) as exc:
        resolve_recipe(name)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_a_typo_in_a_suffix_names_the_suffixes_and_the_nearest_name():
    assert _error("sp50-dnss") == (
        "unknown recipe 'sp50-dnss': '-dnss' is not a suffix sp50 takes (sp<P>-dns, "
        "sp<P>-gradual, sp<P>[-magnitude|-global], sp<P>-sparsegpt, sp<P>-wanda); did you "
        "mean 'sp50-dns'?" + TAIL
    )


def test_a_negative_percent_is_named():
    assert _error("sp-10") == (
        "unknown recipe 'sp-10': -10 is negative: <P> in sp<P> is a percent, written without "
        "a sign; did you mean 'sp10'?" + TAIL
    )


def test_an_unknown_channel_suffix_is_named():
    message = _error("ch50-foo")
    assert message.startswith(
        "unknown recipe 'ch50-foo': '-foo' is not a suffix ch50 takes (ch<P>[-l1|-l2|-taylor][-ft])"
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("sp50-dsn", "sp50-dns"), ("ch50-tayler", "ch50-taylor"), ("nm2:4-wnda", "nm2:4-wanda")],
)
def test_one_edit_away_is_suggested(typo, meant):
    assert f"did you mean '{meant}'" in _error(typo)


def test_a_name_like_no_form_points_to_the_list():
    assert _error("xyz") == "unknown recipe 'xyz'." + TAIL
