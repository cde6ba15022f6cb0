"""PE-wise pruning: the first and last layers are never pruned, at 2 or 8 weight bits; the
short-name form names both widths; the sparsity check speaks of PE tiles."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.pewise import PEWiseConfig, group_norms
from compactnn.recipe import resolve_recipe
from compactnn.registry import SHORT_NAMES

GROUP = (1, 8)


def _cnn():
    """The first conv has one input channel, which a (1, 8) tile does not divide."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 8),
    )  # fmt: skip


def _zero_tiles(layer: nn.Module) -> tuple[int, int]:
    """(all-zero (1, 8) tiles, tiles) of a frozen layer's dequantized weight."""
    z = group_norms(layer.weight.detach(), GROUP) == 0
    return int(z.sum()), z.numel()


@pytest.mark.parametrize(
    "recipe",
    [
        "w2a8-pe50",
        "w8a8-pe50",
    ],
)
def test_ends_are_never_pruned_whatever_the_weight_bits(recipe):
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    q = compactnn.compress(_cnn(), recipe, calib_data=x, progress=False)
    for i in (2, 4):  # interior layers: exactly round(0.5 n) tiles pruned
        zero, n = _zero_tiles(q[i])
        assert zero == round(0.5 * n)
    zero, n = _zero_tiles(q[7])  # the classifier: dense
    assert (zero, n) == (0, 8 * 16 * 36 // 8)
    assert bool((q[0].weight != 0).all())  # the first conv: quantized, not pruned


def test_the_short_name_form_names_both_weight_widths():
    forms = {entry.form: entry.examples for entry in SHORT_NAMES if "-pe<P>" in entry.form}
    assert list(forms) == ["w<2|8>[a<A>]-pe<P>[-seq]"]
    (examples,) = forms.values()
    assert "w8a8-pe50" in examples
    for name in examples:
        config = resolve_recipe(name).steps[0].config
        assert config.weight.bits == int(name[1])


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_is_a_fraction_of_pe_tiles(sparsity):
    with pytest.raises(CompactnnError) as err:
        PEWiseConfig(sparsity=sparsity)
    message = str(err.value)
    assert message.startswith(f"PEWiseConfig.sparsity={sparsity!r} is outside [0, 1)")
    assert "fraction of the PE tiles of each layer to remove" in message
    assert "fraction of weights" not in message
