import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.dns import DNSConfig, DNSPruner, revise_mask
from compactnn.prune.masks import current_masks, dense_weight, sparsity_of
from compactnn.recipe import resolve_recipe


def test_two_threshold_rule():
    w = torch.tensor([0.05, 0.095, 0.105, 0.2])
    old = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert revise_mask(w, old, 0.09, 0.11).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_pruned_weight_gets_gradient_and_is_spliced_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    pruner = DNSPruner(model, DNSConfig(sparsity=0.5, frequency=1))
    mask = current_masks(model)["0"]
    i, j = (mask == 0).nonzero()[0].tolist()
    assert model[0].weight[i, j] == 0
    model(torch.randn(4, 10)).sum().backward()
    dense = dense_weight(model, "0")
    assert dense.grad[i, j] != 0  # straight-through: pruned weights keep learning
    with torch.no_grad():
        dense[i, j] = 10.0  # training pushed it far above the splice threshold
    pruner.step()
    assert current_masks(model)["0"][i, j] == 1
    assert model[0].weight[i, j] == 10.0
    assert pruner.spliced >= 1


@pytest.mark.filterwarnings("ignore:dns step")  # a random MLP at 90%: it may warn of collapse
def test_sp90_dns_reaches_target_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    cfg = DNSConfig(sparsity=0.9, surgery_steps=20, finetune_steps=10, frequency=5)
    recipe = compactnn.Recipe("dns", (compactnn.Step("dns", cfg),))
    pruned = compactnn.compress(model, recipe, calib_data=torch.randn(128, 16), progress=False)
    nnz, total = sparsity_of(pruned)
    assert 0.85 <= 1 - nnz / total <= 0.95


def test_layer_sparsity_overrides_the_uniform_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 10))
    cfg = DNSConfig(sparsity=0.9, layer_sparsity={"2": 0.5})
    DNSPruner(model, cfg)
    masks = current_masks(model)
    assert int((masks["0"] == 0).sum()) == 899  # strictly below the 900th smallest |w|
    assert int((masks["2"] == 0).sum()) == 249  # strictly below the 250th of 500
    assert cfg.sparsity_for("2") == 0.5 and cfg.sparsity_for("0") == 0.9
    assert DNSConfig.from_dict(cfg.to_dict()) == cfg  # YAML round trip (a mapping)


def test_layer_sparsity_refuses_bad_names_and_values():
    with pytest.raises(CompactnnError, match=r"layer_sparsity\['fc'\]"):
        DNSConfig(layer_sparsity={"fc": 1.0})
    with pytest.raises(CompactnnError, match=r"layer_sparsity=3 .*mapping"):
        DNSConfig(layer_sparsity=3)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CompactnnError, match=r"\['fc1'\].*module names"):
        DNSPruner(model, DNSConfig(layer_sparsity={"fc1": 0.5}))


def test_short_name_builds_the_dns_step():
    recipe = resolve_recipe("sp90-dns")
    assert recipe.steps[0].method == "dns" and recipe.steps[0].config == DNSConfig(sparsity=0.9)


@pytest.mark.filterwarnings("ignore:dns step")  # untrained here, so it may warn of collapse
def test_sp90_dns_runs_its_documented_self_distillation_schedule(monkeypatch):
    # 1e-4 and 200+100 steps left 90%-sparse CNNs answering one class (docs/pruning.md);
    # the short name must reach the loop with the measured 600+400 steps at Adam lr 3e-3
    import compactnn.prune.dns as dns

    seen, real = [], dns.prune_while_distilling

    def spy(model, targets, ctx, make_pruner, steps, lr, desc):
        seen.append((steps, lr))
        return real(model, targets, ctx, make_pruner, 0, lr, desc)  # no training in a test

    monkeypatch.setattr(dns, "prune_while_distilling", spy)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    compactnn.compress(model, "sp90-dns", calib_data=torch.randn(64, 8), progress=False)
    cfg = DNSConfig()
    assert seen == [(cfg.surgery_steps + cfg.finetune_steps, cfg.lr)]
    assert (cfg.surgery_steps, cfg.finetune_steps, cfg.lr) == (600, 400, 3e-3)
