import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.nm import NMConfig, holds_nm
from compactnn.recipe import resolve_recipe
from tests.prune._collapse import collapse_warnings


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_2_4_pattern_holds_exactly_after_fine_tuning():
    cfg = NMConfig(n=2, m=4, finetune_steps=20, lr=1e-2)
    recipe = compactnn.Recipe("nm", (compactnn.Step("nm", cfg),))
    model = _model()
    pruned = compactnn.compress(model, recipe, calib_data=torch.randn(64, 16), progress=False)
    for name in ("0", "2"):
        w = pruned.get_submodule(name).weight
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(groups == 2)  # exactly 2 of 4: nothing pruned regrew
        assert holds_nm(w, 2, 4)
    assert not torch.equal(
        pruned[0].weight[pruned[0].weight != 0], model[0].weight[pruned[0].weight != 0]
    )  # it did train


def test_m_not_dividing_the_input_dimension_names_the_layer():
    model = nn.Sequential(nn.Linear(10, 8))
    with pytest.raises(CompactnnError, match=r"M=4 divides the input size of none .*0 \(10 inputs"):
        compactnn.compress(model, "nm2:4", progress=False)


def test_cnn_first_conv_with_9_inputs_stays_dense_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    ).eval()  # first conv: 1x3x3 = 9 inputs per output channel
    with pytest.warns(UserWarning, match=r"kept dense .*M=4\): 0 \(9 inputs\)$") as caught:
        pruned = compactnn.compress(model, "nm2:4", progress=False)
    assert len([w for w in caught if "kept dense" in str(w.message)]) == 1
    assert torch.equal(pruned[0].weight, model[0].weight)  # untouched
    for name in ("2", "4"):
        assert holds_nm(pruned.get_submodule(name).weight, 2, 4)
    info = compactnn.info_of(pruned)
    assert any("0 (9 inputs)" in note for note in info["notes"])
    assert "0" not in info["extra"]["pruning"]["nm"]
    assert info["extra"]["pruning"]["nm"]["2"] == 0.5
    # the step's reason, not "not targeted"; the pruned layers are compressed, not float
    assert info["float_layers"] == {"0": "nm 2:4 kept it dense (input size 9 not divisible by M)"}


def test_bad_n_m():
    with pytest.raises(CompactnnError, match="0 < N < M"):
        NMConfig(n=4, m=4)


def test_short_name_builds_the_nm_step():
    recipe = resolve_recipe("nm2:4")
    assert recipe.steps[0].method == "nm" and recipe.steps[0].config == NMConfig(n=2, m=4)


def _two_faced_net(informative: float, dead: float):
    """Every hidden unit reads inputs 0-1 (which vary) with weights ``informative`` and
    inputs 2-3 (always zero in the data) with weights ``dead``; 2:4 keeps the larger pair."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
        net[0].weight.copy_(torch.cat([informative * signs, dead * torch.ones(4, 2)], 1))
        net[0].bias.fill_(0.1)
        net[2].weight.copy_(torch.eye(4))
        net[2].bias.zero_()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    x[:, 2:] = 0.0
    return net.eval(), x


def _collapse_warnings(net, x, config):
    found, _, want, got = collapse_warnings(net, x, "nm", config)
    return found, len(want.unique()), len(got.unique()), float((got == want).float().mean())


@pytest.mark.parametrize("steps,how", [(0, "one-shot"), (2, "2 self-distillation steps")])
def test_collapsed_nm_result_warns_with_the_way_out(steps, how):
    net, x = _two_faced_net(informative=0.5, dead=3.0)  # 2:4 keeps only the dead inputs
    found, float_classes, pruned_classes, _ = _collapse_warnings(
        net, x, NMConfig(n=2, m=4, finetune_steps=steps, lr=1e-6)
    )
    assert float_classes > 1 and pruned_classes == 1  # the premise, measured
    assert len(found) == 1, found
    msg = found[0]
    assert msg.startswith(f"nm step (2:4, {how}") and "for all 64 calibration samples" in msg
    assert "nm3:4" in msg and "method: nm, config: {n: 2, m: 4, finetune_steps: 1000" in msg
    assert "nm2:4-wanda" in msg and "compactnn.prune.train.finetune" in msg


def test_healthy_nm_result_does_not_warn():
    net, x = _two_faced_net(informative=3.0, dead=0.5)  # 2:4 drops only the dead inputs
    found, float_classes, pruned_classes, agree = _collapse_warnings(net, x, NMConfig())
    assert pruned_classes == float_classes > 1 and agree == 1.0  # the premise, measured
    assert found == []


def test_ft_short_name_fine_tunes_and_the_others_keep_their_meaning():
    one_shot, tuned = resolve_recipe("nm2:4"), resolve_recipe("nm2:4-ft")
    assert one_shot.steps[0].config == NMConfig(n=2, m=4, finetune_steps=0)
    assert tuned.steps[0].config == NMConfig(n=2, m=4, finetune_steps=1000)
    assert tuned.steps[0].config.needs_data()  # the CLI asks for --data before any work
    assert resolve_recipe("nm2:4-wanda").steps[0].method == "wanda"


def test_one_shot_nm_that_changes_many_predictions_warns_with_the_drop_and_the_ft_form():
    # a random MLP: 2:4 changes ~40% of its predictions without collapsing it (4 classes
    # before and after), which the fine-tuned flows' 50% bar let pass silently
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    found, pruned, want, got = collapse_warnings(net, x, "nm", NMConfig(n=2, m=4))
    agree = float((got == want).float().mean())  # by hand, from both models' outputs
    assert 0.5 <= agree < 0.9 and len(got.unique()) == len(want.unique()) > 1  # the premise
    assert len(found) == 1, found
    msg = found[0]
    assert msg.startswith("nm step (2:4, one-shot, no fine-tuning)")
    assert f"agrees with the float model's on {agree:.1%} of the 64 calibration samples" in msg
    assert f"top-1 may fall by up to {100 * (1 - agree):.1f} points" in msg
    assert "(nm2:4-ft)" in msg and msg.index("nm2:4-ft") < msg.index("nm3:4")
    assert any("nm2:4-ft" in n for n in compactnn.info_of(pruned)["notes"])
    # fine-tuned steps keep the collapse bar: the same agreement after training passes
    assert collapse_warnings(net, x, "nm", NMConfig(finetune_steps=1, lr=1e-9))[0] == []
