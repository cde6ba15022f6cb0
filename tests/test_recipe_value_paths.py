"""Recipe files: bad values name their key path, odd files say what is wrong with them, and a
misspelt method gets a suggestion (findings of session 34's testers T1 and T3)."""

from __future__ import annotations

import pytest

from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig
from compactnn.recipe import Recipe, Step, resolve_recipe
from compactnn.registry import UnknownMethodError

STEP = "name: t\nsteps:\n  - method: {method}\n    config: {config}\n"


def _error(tmp_path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CompactnnError) as err:
        resolve_recipe(path)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (  # torch.optim.Adam crashed with "Invalid learning rate: -1.0" and a traceback
            "{ratio: 0.3, finetune_steps: 100, lr: -1}",
            "steps[0].config.lr=-1 must be > 0 (a learning rate, e.g. 0.001).",
        ),
        ("{ratio: 0.3, lr: -1}", "steps[0].config.lr=-1 must be > 0"),  # was accepted
        ("{ratio: 0.3, finetune_steps: -5}", "steps[0].config.finetune_steps=-5 must be >= 0"),
        (
            "{ratio: 0.3, finetune_steps: 1000000000000}",
            "steps[0].config.finetune_steps=1000000000000 must be at most 10,000,000",
        ),
    ],
)
def test_channel_pruning_numbers_are_refused_before_any_work(tmp_path, config, expected):
    message = _error(tmp_path, STEP.format(method="channel", config=config))
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "{weight: {bits: -4}}",
            "steps[0].config.weight.bits=-4 is out of range: compactnn quantizes to 1..8 bits.",
        ),
        (
            "{weight: {bits: 99999999999999999999999999}}",
            "steps[0].config.weight.bits=99999999999999999999999999 is out of range",
        ),
        ("{weight: {bits: 4}, act: {bits: 0}}", "steps[0].config.act.bits=0 is out of range"),
    ],
)
def test_a_range_error_names_the_key_path_like_a_type_error(tmp_path, config, expected):
    """It said 'bits=-4 is out of range' with no path (type errors gave one)."""
    message = _error(tmp_path, STEP.format(method="rtn", config=config))
    assert message.startswith(expected), message


def test_a_range_error_of_the_second_step_names_it(tmp_path):
    text = "steps:\n  - method: rtn\n  - method: channel\n    config: {ratio: 1.5}\n"
    assert _error(tmp_path, text).startswith("steps[1].config.ratio=1.5 is outside [0, 1)")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_recipe_file_says_it_is_empty(tmp_path, text):
    """It said "a recipe is a mapping with a 'steps' list ..., got None"."""
    message = _error(tmp_path, text, "empty.yaml")
    assert "empty.yaml' is empty: write a mapping with a 'steps' list" in message
    assert "None" not in message


def test_tabs_get_the_fix(tmp_path):
    message = _error(tmp_path, "name: t\nsteps:\n\t- method: rtn\n")
    assert "line 3, column 1" in message
    assert message.endswith("indent with spaces, not tabs."), message


@pytest.mark.parametrize(
    ("text", "tag", "where"),
    [
        (
            'name: !!python/object/apply:os.system ["true"]\nsteps:\n  - method: rtn\n',
            "'!!python/object/apply:os.system'",
            "line 1, column 7",
        ),
        ("name: t\nsteps: !custom\n  - method: rtn\n", "'!custom'", "line 2, column 8"),
    ],
)
def test_tags_are_refused_as_tags_with_their_line(tmp_path, text, tag, where):
    """The reason was PyYAML's 'could not determine a constructor for the tag ...'."""
    message = _error(tmp_path, text)
    assert f"at {where}: YAML tags ({tag}) are not allowed in a recipe" in message
    assert "plain YAML (mappings, lists, numbers, strings)" in message
    assert "constructor" not in message


def test_a_misspelt_short_name_method_gets_the_whole_name_suggested():
    """`--recipe w4a4-qdorp` listed the 40 methods but suggested nothing."""
    with pytest.raises(UnknownMethodError) as err:
        resolve_recipe("w4a4-qdorp")
    message = str(err.value)
    assert message.startswith(
        "unknown method 'qdorp' in recipe 'w4a4-qdorp'; did you mean 'w4a4-qdrop'? known methods:"
    ), message
    assert err.value.name == "qdorp"
    assert resolve_recipe("w4a4-qdrop").steps[0].method == "qdrop"  # the suggestion builds


def test_a_short_name_with_nothing_near_suggests_nothing():
    with pytest.raises(UnknownMethodError) as err:
        resolve_recipe("w4a8-zzzzzz")
    assert "did you mean" not in str(err.value) and "known methods: adaround" in str(err.value)


def test_a_misspelt_yaml_step_method_gets_a_suggestion(tmp_path):
    message = _error(tmp_path, "steps:\n  - method: gtpq\n")
    assert message.startswith("steps[0].method: unknown method 'gtpq'; did you mean 'gptq'?")


def test_a_python_built_step_is_checked_too():
    with pytest.raises(CompactnnError, match=r"^ChannelConfig\.lr=-1\.0 must be > 0"):
        Recipe("r", (Step("channel", ChannelConfig(finetune_steps=100, lr=-1.0)),))
    with pytest.raises(UnknownMethodError, match="did you mean 'qdrop'"):
        Step("qdorp", ChannelConfig())


def test_valid_values_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(STEP.format(method="channel", config="{ratio: 0.3, finetune_steps: 0}"))
    assert resolve_recipe(path).steps[0].config.finetune_steps == 0
    path.write_text(STEP.format(method="channel", config="{finetune_steps: 100, lr: 2e-3}"))
    assert resolve_recipe(path).steps[0].config.lr == 2e-3
