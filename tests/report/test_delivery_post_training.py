"""``training_recipe``: a training-aware config whose method is complete without training
(Network Sketching: the paper's basic form needs no retraining, ``docs/sub-bit.md`` runs it
post-training) is not a training recipe: compress prints no "train it" note, and report and
eval give it no "calibrated only, not trained" label. Every method with a training phase
still is one."""

import pytest

import compactnn
from compactnn.commands.compress import note_training_recipe
from compactnn.engines.qat import QATConfig
from compactnn.report.delivery import training_recipe, untrained_label

# The QATConfig methods whose compress form is the whole method (no training phase): the
# sketch card (seed-method-cards A1, "no retraining is needed in the basic form") and
# TernaryBERT (distils on the calibration text inside compress).
POST_TRAINING = {"sketch", "ternarybert"}


@pytest.mark.parametrize("name", ["w2-sketch", "w1a8-sketch", "w3-sketch"])
def test_network_sketching_is_post_training(name, capsys):
    recipe = compactnn.resolve_recipe(name)
    assert isinstance(recipe.steps[0].config, QATConfig)  # the engine it runs through
    assert training_recipe(recipe) is False
    assert untrained_label({"recipe": recipe, "extra": {}}) == ""
    note_training_recipe(recipe, "digits-resnet", name)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "name", ["w4a4-lsq", "w2a8-twn", "w2a8-ttq", "w2a8-pe50", "w2a8-tsq", "w1a8-subbit"]
)
def test_methods_with_a_training_phase_stay_training_recipes(name, capsys):
    recipe = compactnn.resolve_recipe(name)
    assert training_recipe(recipe) is True
    assert untrained_label({"recipe": recipe, "extra": {}}) == " (calibrated only, not trained)"
    note_training_recipe(recipe, "m", name)
    assert f"compactnn train m --recipe {name}" in capsys.readouterr().err


def test_only_the_post_training_methods_are_exempt():
    """Every registered training-aware method but the post-training ones is a training
    recipe (one step of its config with defaults)."""
    from compactnn import registry

    compactnn.resolve_recipe("w8a8")  # the registry is filled
    exempt = set()
    for name, entry in registry.METHODS.items():
        if not issubclass(entry.config_cls, QATConfig):
            continue
        try:
            config = entry.config_cls()
        except compactnn.CompactnnError:  # a config without usable defaults: its short name
            config = compactnn.resolve_recipe(f"w1a1-{name}").steps[0].config
        if not training_recipe(compactnn.Recipe(name, (compactnn.Step(name, config),))):
            exempt.add(name)
    assert exempt == POST_TRAINING
