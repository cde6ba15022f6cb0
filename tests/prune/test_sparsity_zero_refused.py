"""A pruning step that removes nothing (sparsity or ratio 0) is refused, as ``sp0`` and
``ChannelConfig(ratio=0)`` are: it would write a "pruned" artifact of the float model."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.dns import DNSConfig
from compactnn.prune.gradual import GradualConfig
from compactnn.prune.magnitude import MagnitudeConfig
from compactnn.prune.probe import ProbePruneConfig


def test_a_yaml_magnitude_step_with_sparsity_zero_is_refused():
    text = "name: bad\nsteps:\n  - method: magnitude\n    config: {sparsity: 0.0}\n"
    with pytest.raises(CompactnnError, match=r"MagnitudeConfig\(sparsity=0\) removes nothing"):
        compactnn.Recipe.from_yaml(text)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: MagnitudeConfig(sparsity=0), "e.g. sparsity=0.5 (short name sp50)."),
        (lambda: GradualConfig(final_sparsity=0.0), "e.g. final_sparsity=0.9 (sp90-gradual)."),
        (lambda: DNSConfig(sparsity=0), "e.g. sparsity=0.9 (short name sp90-dns)."),
        (lambda: ProbePruneConfig(ratio=0), "e.g. ratio=0.3 (pp30)."),
    ],
)
def test_each_sparsity_config_refuses_zero_in_one_line(make, words):
    with pytest.raises(CompactnnError, match="removes nothing: give the fraction of") as err:
        make()
    assert str(err.value).endswith(words) and "\n" not in str(err.value)


def test_zero_is_still_allowed_where_something_else_prunes():
    assert DNSConfig(sparsity=0, layer_sparsity={"fc": 0.5}).layer_sparsity == (("fc", 0.5),)
    assert GradualConfig(initial_sparsity=0.0).final_sparsity > 0  # the ramp starts at 0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_shot_steps_with_sparsity_zero_are_refused(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    recipe = compactnn.Recipe.from_yaml(
        f"name: bad\nsteps:\n  - method: {method}\n    config: {{sparsity: 0.0}}\n"
    )
    with pytest.raises(CompactnnError, match=f"{method} with sparsity=0 removes nothing"):
        compactnn.compress(model, recipe, calib_data=torch.randn(64, 8), progress=False)
