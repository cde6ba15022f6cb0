"""Pruning inputs that remove nothing or cannot be trained on are refused in one line."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig
from compactnn.prune.train import finetune
from compactnn.recipe import resolve_recipe


@pytest.mark.parametrize("name", ["sp0", "sp0-global", "sp0-wanda", "sp0-sparsegpt", "sp0-gradual"])
def test_a_zero_percent_pruning_recipe_is_refused(name):
    with pytest.raises(CompactnnError, match=rf"recipe '{name}' removes nothing \(0%\).*sp50"):
        resolve_recipe(name)


def test_a_channel_ratio_out_of_range_names_channels_not_weights():
    with pytest.raises(
        CompactnnError, match=r"ratio=1.5 is outside \[0, 1\).*fraction of channels"
    ):
        ChannelConfig(ratio=1.5)
    with pytest.raises(CompactnnError, match=r"heads=2.0 is outside.*fraction of attention heads"):
        ChannelConfig(heads=2)


def test_finetune_on_unlabelled_batches_says_it_needs_pairs_and_leaves_the_model_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, :2] = 0  # sparse: finetune freezes these zeros as masks
    before = model[0].weight.detach().clone()
    with pytest.raises(
        CompactnnError,
        match=r"needs \(inputs, labels\) batches, got a Tensor of "
        r"shape \(2, 4\)",
    ) as err:
        finetune(model, [torch.randn(2, 4)], epochs=1)  # 2 rows: x, y = batch would "work"
    assert "\n" not in str(err.value)
    assert not parametrize.is_parametrized(model[0], "weight")
    assert torch.equal(model[0].weight, before)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    finetune(model, [(x, y)], epochs=1)  # pairs still train, zeros kept
    assert torch.all(model[0].weight[0, :2] == 0) and not torch.equal(model[0].weight, before)
