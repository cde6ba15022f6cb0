"""Strict recipe and config types: every mistake is one CompactnnError naming the field
(issue 11). Field types are checked generically from the dataclass type hints."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Literal

import pytest

from compactnn import registry
from compactnn.core.config import MethodConfig
from compactnn.core.fields import normalize
from compactnn.core.modules import Targets
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.prune.nm import NMConfig
from compactnn.quant.gptq import GPTQConfig
from compactnn.quant.rtn import RTNConfig
from compactnn.recipe import Recipe, Step


def _yaml(body: str) -> Recipe:
    return Recipe.from_yaml(textwrap.dedent(body))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("steps: [{method: rtn, config: {weight: {bits: true}}}]", r"weight\.bits=True .*integer"),
        (
            "steps: [{method: rtn, config: {weight: {bits: 4, symmetric: 'false'}}}]",
            r"weight\.symmetric='false' .*boolean",
        ),
        (
            "steps: [{method: rtn, config: {act: {granularity: tensor, percentile: abc}}}]",
            r"steps\[0\]\.config\.act\.percentile='abc' .*number",
        ),
        ("steps: [{method: rtn, config: {weight: {bits: '4'}}}]", r"bits='4' .*integer"),
        ("steps: [{method: rtn, config: {fold_bn: 1}}]", r"config\.fold_bn=1 .*boolean"),
        ("steps: [{method: rtn, config: {first_last_bits: 8.0}}]", r"first_last_bits=8\.0"),
        ("steps: [{method: rtn, targets: []}]", r"targets=\[\] must be a mapping"),
        ("steps: [{method: rtn, targets: {names: []}}]", r"targets\.names is empty"),
        ("steps: [{method: rtn, targets: {ignore: [1]}}]", r"targets\.ignore=\[1\]"),
        ("steps: [{method: rtn, targets: {skip: [fc]}}]", r"targets: unknown key.*'skip'"),
        ("steps: [{method: rtn, config: {weight: {bitz: 4}}}]", r"weight: unknown key.*'bitz'"),
        ("steps: [{method: rtn, config: {weights: {}}}]", r"config: unknown key.*'weights'"),
        ("steps: [{method: rtn, config: [8]}]", r"steps\[0\]\.config must be a mapping"),
        ("steps: [{method: rtn, extra: 1}]", r"steps\[0\]: unknown key.*'extra'"),
        ("steps: [rtn]", r"steps\[0\] must be a mapping"),
        ("steps: [{config: {}}]", r"steps\[0\] needs a 'method'"),
        ("name: x\nsteps: [{method: rtn}]\nnotes: hi", r"recipe: unknown key.*'notes'"),
        ("name: [x]\nsteps: [{method: rtn}]", r"recipe name=\['x'\] must be a string"),
        ("steps: []", r"has no steps"),
        ("steps: [{method: nm, config: {n: 2, m: 4, finetune_steps: 1.5}}]", r"finetune_steps"),
        ("steps: [{method: inq, config: {portions: 0.5}}]", r"portions=0\.5 .*list"),
        ("steps: [{method: inq, config: {portions: [0.5, x]}}]", r"portions\[1\]='x'"),
    ],
)
def test_recipe_mistakes_are_one_line_errors_naming_the_field(body, needle):
    with pytest.raises(CompactnnError, match=needle) as exc:
        _yaml(body)
    assert "\n" not in str(exc.value)


def test_valid_yaml_parses_with_yaml12_floats_and_round_trips():
    recipe = _yaml(
        """
        name: w4a8-gptq
        steps:
          - method: gptq
            targets: {classes: Linear, ignore: [lm_head]}
            config:
              weight: {bits: 4, symmetric: false, granularity: group, group_size: 32}
              act: {bits: 8, symmetric: false, granularity: tensor, percentile: 99}
              damp: 1e-2
              block_size: 64
          - method: dns
            config: {layer_sparsity: {fc1: 0.5}}
        """
    )
    cfg = recipe.steps[0].config
    assert cfg.damp == 0.01 and isinstance(cfg.damp, float)  # '1e-2' is a number (YAML 1.2)
    assert cfg.act.percentile == 99.0 and isinstance(cfg.act.percentile, float)
    assert recipe.steps[0].targets == Targets(classes=("Linear",), ignore=("lm_head",))
    assert recipe.steps[1].config.layer_sparsity == (("fc1", 0.5),)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_every_registered_config_round_trips_through_from_dict():
    import compactnn.methods  # noqa: F401  (registers every method)

    for entry in registry.METHODS.values():
        cfg = entry.config_cls()
        assert entry.config_cls.from_dict(cfg.to_dict()) == cfg, entry.name


def test_direct_construction_is_checked_too():
    with pytest.raises(CompactnnError, match=r"QuantSpec\.bits=True"):
        QuantSpec(bits=True)
    with pytest.raises(CompactnnError, match=r"RTNConfig\.fold_bn='no'"):
        RTNConfig(fold_bn="no")
    lr = NMConfig(lr=1).lr
    assert lr == 1.0 and isinstance(lr, float)  # an int is a fine float, stored as float


def test_step_refuses_a_config_of_another_method():
    with pytest.raises(CompactnnError, match=r"Step\('rtn', \.\.\.\) got a GPTQConfig.*RTNConfig"):
        Step("rtn", GPTQConfig())
    assert Step("gptq", GPTQConfig()).config == GPTQConfig()


def test_step_refuses_targets_that_are_not_targets():
    with pytest.raises(CompactnnError, match="targets must be a Targets"):
        Step("rtn", RTNConfig(), {"ignore": ["fc"]})


@dataclasses.dataclass(frozen=True)
class _Toy(MethodConfig):
    mode: Literal["fast", "exact"] = "fast"
    pair: tuple[int, str] = (1, "a")
    maybe: float | None = None


def test_generic_hints_literal_fixed_tuple_optional():
    assert _Toy.from_dict({"mode": "exact", "pair": [2, "b"], "maybe": 3}) == _Toy(
        "exact", (2, "b"), 3.0
    )
    with pytest.raises(CompactnnError, match=r"_Toy\.mode='slow' .*one of 'fast', 'exact'"):
        _Toy.from_dict({"mode": "slow"})
    with pytest.raises(CompactnnError, match=r"_Toy\.pair=\[1\] must have exactly 2 items"):
        _Toy.from_dict({"pair": [1]})
    with pytest.raises(CompactnnError, match=r"_Toy\.maybe='x' .*number"):
        _Toy.from_dict({"maybe": "x"})


def test_normalize_rejects_bool_as_number_and_accepts_int_as_float():
    with pytest.raises(CompactnnError, match="lr=True"):
        normalize(True, float, "lr")
    assert normalize(3, float, "lr") == 3.0 and isinstance(normalize(3, float, "lr"), float)


def test_needs_data_says_which_steps_calibrate():
    from compactnn.recipe import resolve_recipe

    needs = {
        name: [s.config.needs_data() for s in resolve_recipe(name).steps]
        for name in ("w8", "w4-g32", "w4a8", "w4-g32-gptq", "w4-g32-awq")
    }
    assert needs == {
        "w8": [False],
        "w4-g32": [False],
        "w4a8": [True],  # activation grids are calibrated
        "w4-g32-gptq": [True],
        "w4-g32-awq": [True],
    }
