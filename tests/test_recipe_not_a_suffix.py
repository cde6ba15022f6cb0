"""A method that is no quantizer (the pruning methods, cle) is no suffix of
``w<W>[a<A>]-<method>``: the one-line error names its own short-name forms with an example
that builds a recipe of that method, and a YAML recipe that chains it with the quantization
the name asked for; a method with no short name (cle) gets the YAML step only."""

import re

import pytest

import compactnn
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, method_short_forms, resolve_recipe

NOT_SUFFIXES = ["channel", "dns", "gradual", "magnitude", "nm", "probe", "sparsegpt", "wanda"]


def _error(name: str) -> str:
    with pytest.raises(CompactnnError) as exc:
        resolve_recipe(name)
    text = str(exc.value)
    assert "\n" not in text and "has no short quantization name" not in text
    return text


def _yaml_steps(text: str) -> Recipe:
    """The ``steps: [...]`` the message shows, read as a YAML recipe."""
    found = re.search(r"steps: (\[.*\]) \(docs", text)
    assert found, text
    return Recipe.from_yaml(f"name: shown\nsteps: {found[1]}")


@pytest.mark.parametrize("method", NOT_SUFFIXES)
def test_a_pruning_method_suffix_names_its_own_short_names(method):
    text = _error(f"w4a8-{method}")
    examples = re.findall(r"e\.g\. ([a-z0-9:-]+)", text)
    assert examples, text
    for example in examples:  # each example is a recipe of that very method
        assert [s.method for s in resolve_recipe(example).steps] == [method], example
    recipe = _yaml_steps(text)
    assert [s.method for s in recipe.steps] == [method, "rtn"]
    quant, plain = recipe.steps[1].config, resolve_recipe("w4a8").steps[0].config
    assert (quant.weight, quant.act) == (plain.weight, plain.act)  # the grids w4a8 names


def test_the_forms_are_the_listed_ones():
    forms = dict(method_short_forms("wanda"))
    assert forms == {"sp<P>-wanda": "sp50-wanda", "nm<N>:<M>-wanda": "nm2:4-wanda"}
    assert method_short_forms("cle") == []
    text = _error("w4a8-wanda")
    assert "sp<P>-wanda (e.g. sp50-wanda) or nm<N>:<M>-wanda (e.g. nm2:4-wanda)" in text


def test_cle_has_no_short_name_and_is_shown_as_a_yaml_step():
    text = _error("w8a8-cle")
    assert "no short name" in text
    recipe = _yaml_steps(text)
    assert [s.method for s in recipe.steps] == ["cle", "rtn"]
    quant, plain = recipe.steps[1].config, resolve_recipe("w8a8").steps[0].config
    assert (quant.weight, quant.act) == (plain.weight, plain.act)


def test_a_weight_only_group_name_keeps_its_grid_in_the_yaml():
    recipe = _yaml_steps(_error("w4-g32-magnitude"))
    plain = resolve_recipe("w4-g32").steps[0].config
    assert recipe.steps[1].config.weight == plain.weight
    assert recipe.steps[1].config.act is None is plain.act


def test_the_shown_recipe_compresses():
    """The YAML the error shows is a working recipe (a tiny CNN, cle then w8a8)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = compactnn.compress(net, _yaml_steps(_error("w8a8-cle")), calib_data=x, progress=False)
    assert all(hasattr(q[i], "weight_codes") for i in (0, 2))
