import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.nm import NMConfig, holds_nm
from compactnn.recipe import resolve_recipe


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
