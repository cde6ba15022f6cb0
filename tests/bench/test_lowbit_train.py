"""The IR-Net arms of the ``lowbit_train`` bench section (issue 19, session 23)."""

from compactnn.bench.lowbit_train import irnet_length_arms
from compactnn.engines.irnet import IRNET_LR
from compactnn.recipe import resolve_recipe
from compactnn.training.loop import epochs_for_min_steps


def _config(make):
    recipe = make()
    recipe = resolve_recipe(recipe) if isinstance(recipe, str) else recipe
    return recipe.steps[0].config


def test_length_arms_train_both_arms_equally_long():
    arms = dict(irnet_length_arms(steps=1200))
    xnor = _config(arms["w1a1-xnor, 1200 steps"])
    irnet = _config(arms["xnor + IR-Net (both), 1200 steps"])
    base = resolve_recipe("w1a1-xnor").steps[0].config
    assert xnor.min_steps == irnet.min_steps == 1200 == 2 * base.min_steps
    assert xnor.epochs == irnet.epochs == base.epochs
    # 3,400 validation-training digits at batch 64: 54 steps an epoch, 23 epochs for 1,200
    spe = -(-3400 // xnor.batch_size)
    assert epochs_for_min_steps(xnor.epochs, spe, xnor.min_steps) == -(-1200 // spe) == 23
    # XNOR keeps its own defaults; the IR-Net arm only adds the two options (and their lr)
    assert (xnor.lr, xnor.libra_pb, xnor.ede) == (base.lr, False, False)
    assert (irnet.libra_pb, irnet.ede, irnet.ede_on, irnet.lr) == (True, True, "weights", IRNET_LR)


def test_length_arms_learning_rate_levers():
    arms = dict(irnet_length_arms())
    for name, lr in (("1e-3", 1e-3), ("3e-3", 3e-3)):
        cfg = _config(arms[f"xnor + IR-Net, irnet_lr {name}"])
        assert (cfg.libra_pb, cfg.ede, cfg.lr, cfg.irnet_lr) == (True, True, lr, lr)
        assert cfg.min_steps == resolve_recipe("w1a1-xnor").steps[0].config.min_steps
