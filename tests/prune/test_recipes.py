import pytest

from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig
from compactnn.prune.dns import DNSConfig
from compactnn.prune.nm import NMConfig
from compactnn.prune.sparsegpt import SparseGPTConfig
from compactnn.recipe import Recipe, resolve_recipe


@pytest.mark.parametrize(
    ("name", "method", "config"),
    [
        ("sp90-dns", "dns", DNSConfig(sparsity=0.9)),
        ("ch30", "channel", ChannelConfig(ratio=0.3)),
        ("nm2:4", "nm", NMConfig(n=2, m=4)),
        ("sp50-sparsegpt", "sparsegpt", SparseGPTConfig(sparsity=0.5)),
    ],
)
def test_short_names_build_the_method_step(name, method, config):
    recipe = resolve_recipe(name)
    assert recipe.steps[0].method == method and recipe.steps[0].config == config


def test_percent_out_of_range_is_refused():
    with pytest.raises(CompactnnError, match=r"100% is outside \[0, 100\)"):
        resolve_recipe("sp100")


def test_prune_then_quantize_chain_round_trips_yaml():
    text = (
        "name: chain\nsteps:\n"
        "  - {method: gradual, config: {final_sparsity: 0.8, end_step: 50}}\n"
        "  - {method: rtn, config: {weight: {bits: 4, symmetric: false}}}\n"
    )
    recipe = Recipe.from_yaml(text)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert [s.method for s in recipe.steps] == ["gradual", "rtn"]
