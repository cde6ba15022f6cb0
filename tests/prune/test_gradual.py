import torch
from torch import nn

from compactnn.prune.gradual import GradualConfig, GradualPruner, cubic_sparsity
from compactnn.prune.train import finetune
from compactnn.recipe import Recipe, resolve_recipe


def test_cubic_schedule_matches_zhu_gupta_formula():
    cfg = GradualConfig(final_sparsity=0.8, initial_sparsity=0.2, begin_step=10, end_step=50)
    assert cubic_sparsity(5, cfg) == 0.0
    assert abs(cubic_sparsity(10, cfg) - 0.2) < 1e-12
    assert abs(cubic_sparsity(30, cfg) - (0.8 + (0.2 - 0.8) * 0.5**3)) < 1e-12
    assert abs(cubic_sparsity(50, cfg) - 0.8) < 1e-12 and cubic_sparsity(99, cfg) == cubic_sparsity(
        50, cfg
    )


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_gradual_pruner_in_a_user_loop_reaches_final_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    pruner = GradualPruner(model, GradualConfig(final_sparsity=0.75, end_step=8, frequency=2))
    finetune(model, _data(), epochs=3, lr=1e-2, pruner=pruner)
    for layer in (model[0], model[2]):
        assert int((layer.weight == 0).sum()) == round(0.75 * layer.weight.numel())
        assert not hasattr(layer, "parametrizations")


def test_masks_survive_fine_tuning_with_weight_decay_and_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        model[0].weight[:, :4] = 0.0
    zeros = model[0].weight == 0
    finetune(model, _data(), epochs=3, lr=1e-2)
    assert torch.all(model[0].weight[zeros] == 0)
    assert torch.all(model[0].weight[~zeros] != 0)


def test_short_name_builds_the_gradual_step():
    step = resolve_recipe("sp80-gradual").steps[0]
    assert step.method == "gradual" and step.config == GradualConfig(final_sparsity=0.8)


def test_prune_then_quantize_chain_round_trips_yaml():
    text = (
        "name: chain\nsteps:\n"
        "  - {method: gradual, config: {final_sparsity: 0.8, end_step: 50}}\n"
        "  - {method: rtn, config: {weight: {bits: 4, symmetric: false}}}\n"
    )
    recipe = Recipe.from_yaml(text)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert [s.method for s in recipe.steps] == ["gradual", "rtn"]


def test_sp90_gradual_runs_its_documented_self_distillation_schedule(monkeypatch):
    # 1e-4 and 200+100 steps left 90%-sparse CNNs answering one class (docs/pruning.md);
    # the short name must reach the loop with the measured 600+400 steps at Adam lr 3e-3
    import compactnn
    import compactnn.prune.gradual as gradual

    seen, real = [], gradual.prune_while_distilling

    def spy(model, targets, ctx, make_pruner, steps, lr, desc):
        seen.append((steps, lr))
        return real(model, targets, ctx, make_pruner, 0, lr, desc)  # no training in a test

    monkeypatch.setattr(gradual, "prune_while_distilling", spy)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    compactnn.compress(model.eval(), "sp90-gradual", calib_data=torch.randn(64, 8), progress=False)
    cfg = GradualConfig()
    assert seen == [(cfg.end_step + cfg.finetune_steps, cfg.lr)]
    assert (cfg.end_step, cfg.finetune_steps, cfg.lr) == (600, 400, 3e-3)
