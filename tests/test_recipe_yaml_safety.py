"""Recipe YAML a user did not write carefully (or an attacker did): an alias bomb, deep
nesting and syntax errors are one-line CompactnnErrors in milliseconds, never a
MemoryError, a RecursionError or PyYAML's several-line position block."""

from __future__ import annotations

import time

import pytest

from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, resolve_recipe


def _laughs(levels: int = 9) -> str:
    """A 'billion laughs' recipe: 9 copies of 9 copies ... of 'lol' where bits go."""
    anchors = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        anchors.append(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return (
        "name: x\nsteps:\n  - method: rtn\n"
        f"    config: {{weight: {{bits: [{', '.join(anchors)}]}}}}\n"
    )


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs())
    start = time.perf_counter()
    with pytest.raises(CompactnnError) as exc:
        resolve_recipe(str(path))
    assert time.perf_counter() - start < 1.0
    msg = _one_line(exc)
    assert f"recipe file {str(path)!r} at line 4, column 30" in msg
    assert "anchors and aliases" in msg


@pytest.mark.parametrize(
    "text",
    [
        "name: &n x\nsteps: [{method: rtn}]\n",  # an anchor alone
        "name: x\nbase: &b {method: rtn}\nsteps: [*b]\n",  # an alias
        "name: x\nsteps:\n  - &s {method: rtn}\n  - <<: *s\n",  # a merge key's alias
    ],
)
def test_anchors_and_aliases_are_refused(text):
    with pytest.raises(CompactnnError, match="anchors and aliases") as exc:
        Recipe.from_yaml(text)
    _one_line(exc)


def test_deep_nesting_is_one_line_not_a_recursion_error():
    text = "name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(CompactnnError, match="nested over 32 levels") as exc:
        Recipe.from_yaml(text)
    assert "line 2, column 39" in _one_line(exc)


def test_a_few_levels_still_load():
    nested = "{classes: [Linear], names: ['*'], ignore: [lm_head]}"
    recipe = Recipe.from_yaml(
        f"name: ok\nsteps:\n  - method: rtn\n    targets: {nested}\n"
        "    config: {weight: {bits: 4, symmetric: false}, act: {bits: 8}}\n"
    )
    assert recipe.steps[0].config.weight.bits == 4


def test_a_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps:\n  - method: rtn\n    config: {weight: {bits: 4\n")
    with pytest.raises(CompactnnError) as exc:
        resolve_recipe(path)
    assert _one_line(exc) == (
        f"recipe file {str(path)!r} is not valid YAML: line 5, column 1: expected ',' or '}}', "
        "but got '<stream end>' (while parsing a flow mapping)"
    )


def test_a_key_given_twice_is_still_refused():
    with pytest.raises(CompactnnError, match="given twice"):
        Recipe.from_yaml("name: x\nname: y\nsteps: [{method: rtn}]\n")


def test_a_huge_literal_value_is_shown_cut():
    big = "[" + ", ".join(["[" + ", ".join(['"lol"'] * 200) + "]"] * 200) + "]"
    for text in (
        f"name: {big}\nsteps: [{{method: rtn}}]\n",
        f"name: x\nsteps: [{{method: rtn, config: {{weight: {{bits: {big}}}}}}}]\n",
        f"name: x\nsteps: [{{method: {big}}}]\n",
        f"{big}\n",
    ):
        with pytest.raises(CompactnnError) as exc:
            Recipe.from_yaml(text)
        assert "..." in _one_line(exc)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("name: {big}\nsteps: []\n", "recipe 'xxx", "xxx' has no steps."),
        ("steps:\n- method: rtn\n  ? {big}\n  : 1\n  ? {big}\n  : 2\n", "recipe key 'x", "' is"),
    ],
)
def test_a_huge_name_or_key_is_echoed_cut_to_200_characters(tmp_path, text, start, end):
    path = tmp_path / "huge.yaml"
    path.write_text(text.format(big="x" * 1_000_000))
    with pytest.raises(CompactnnError) as err:
        resolve_recipe(str(path))
    message = str(err.value)
    assert message.startswith(start) and end in message and "x..." in message
    assert len(message) < 400


def test_a_huge_blank_recipe_name_is_echoed_cut():
    with pytest.raises(CompactnnError) as err:
        resolve_recipe(" " * 1_000_000)
    assert len(str(err.value)) < 300 and str(err.value).endswith("or a recipe YAML file.")
