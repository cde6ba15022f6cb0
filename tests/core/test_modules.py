import warnings
from collections import OrderedDict

import torch
from torch import nn

from compactnn.core.modules import (
    Targets,
    attention_out_projs,
    execution_order,
    select_modules,
    set_module,
    state_with_metadata,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)  # registered first, runs last
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def test_targets_by_class_name_and_ignore():
    net = Net()
    t = Targets(classes=("Linear",), names=("*",), ignore=("head",))
    assert list(select_modules(net, t)) == ["body.0"]
    assert Targets.from_dict(t.to_dict()) == t


def test_execution_order_follows_forward_not_registration():
    import torch

    net = Net()
    order = execution_order(net, ["head", "body.0"], lambda m: m(torch.zeros(1, 3)))
    assert order == ["body.0", "head"]


def test_set_module_in_sequential():
    net = Net()
    set_module(net, "body.1", nn.Tanh())
    assert isinstance(net.body[1], nn.Tanh)


def _recipe(targets):
    from compactnn.quant.rtn import RTNConfig
    from compactnn.recipe import Recipe, Step

    return Recipe("r", (Step("rtn", RTNConfig(), targets),))


def test_unknown_target_class_is_refused_with_suggestion():
    import pytest

    from compactnn.core.modules import check_target_names
    from compactnn.errors import CompactnnError

    with pytest.raises(CompactnnError, match=r"'Linaer' is not a layer class.*mean Linear"):
        check_target_names(Net(), _recipe(Targets(classes=("Conv3d", "Linaer"))))


def test_target_classes_all_absent_from_model_are_refused_naming_present_classes():
    import pytest

    from compactnn.core.modules import check_target_names
    from compactnn.errors import CompactnnError

    with pytest.raises(CompactnnError, match=r"'Conv3d', 'Conv1d' match no module.*Linear"):
        check_target_names(Net(), _recipe(Targets(classes=("Conv3d", "Conv1d"))))
    check_target_names(Net(), _recipe(Targets(classes=("Linear",))))  # present: accepted
    # one class present: the step targets it (a recipe reused across models)
    check_target_names(Net(), _recipe(Targets(classes=("Conv3d", "Linear"))))
    check_target_names(Net(), _recipe(Targets()))  # defaults: Conv absent, still accepted


def test_ignore_pattern_matching_nothing_is_refused_but_name_dot_star_is_kept():
    import pytest

    from compactnn.core.modules import check_target_names
    from compactnn.errors import CompactnnError

    with pytest.raises(CompactnnError, match=r"targets.ignore: 'nosuch\*' matches no module"):
        check_target_names(Net(), _recipe(Targets(ignore=("head", "nosuch*"))))
    with pytest.raises(CompactnnError, match=r"'nosuch\.\*' matches no module"):
        check_target_names(Net(), _recipe(Targets(ignore=("nosuch.*",))))
    # what --ignore adds for a leaf: "head.*" matches nothing, but "head" does
    check_target_names(Net(), _recipe(Targets(ignore=("head", "head.*", "body.*"))))


def test_attention_out_projs_names_each_attention_and_its_projection():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    net = nn.Sequential(
        nn.Linear(8, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )
    assert attention_out_projs(net) == {
        "1.layers.0.self_attn.out_proj": "1.layers.0.self_attn",
        "1.layers.1.self_attn.out_proj": "1.layers.1.self_attn",
    }
    assert attention_out_projs(nn.MultiheadAttention(4, 2)) == {"out_proj": ""}
    assert attention_out_projs(Net()) == {}


def test_state_with_metadata_carries_the_module_versions():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    plain = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    state = state_with_metadata(net, plain)
    assert state._metadata == net.state_dict()._metadata  # BatchNorm's version is 2
    assert state._metadata["1"]["version"] == 2 and list(state) == list(plain)
    own = OrderedDict(plain)
    own._metadata = {"": {"version": 1}}  # a state dict with its own record keeps it
    assert state_with_metadata(net, own)._metadata == {"": {"version": 1}}


def test_a_compressed_encoder_layer_runs_its_own_layers_not_pytorchs_fused_kernel(tmp_path):
    """nn.TransformerEncoderLayer's eval-mode fast path reads linear1/linear2's weights
    without calling them: quantized there, they would be skipped (and calibration saw them
    never run). Outputs with and without the fast path must agree, after a reload too."""
    import compactnn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    net = nn.Sequential(nn.Linear(8, 32), enc)
    x = torch.randn(16, 10, 8)
    with warnings.catch_warnings():  # the attention's float weights are named: not tested here
        warnings.simplefilter("ignore")
        q = compactnn.compress(net.eval(), "w8a8", calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    fresh = nn.Sequential(
        nn.Linear(8, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )
    back = compactnn.load(tmp_path / "a", model=fresh)
    with torch.no_grad():
        outs = [q(x), back(x)]
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = q(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    # equal up to the attention's own fused kernel (float, ~5e-7); a bypassed quantized
    # layer moved the output ~1e-2
    for out in outs:
        torch.testing.assert_close(out, slow, atol=1e-5, rtol=0)
    assert not torch.equal(slow, net(x))  # quantized: not the float model
    assert net.eval()[1].layers[0].activation_relu_or_gelu  # the input model is unchanged


def test_bad_targets_are_quoted_cut_short():
    """targets from a recipe file with thousands of entries were printed whole."""
    import pytest

    from compactnn.core.modules import Targets
    from compactnn.errors import CompactnnError

    for bad in (dict(names=list(range(3000))), ["fc"] * 3000):
        with pytest.raises(CompactnnError, match="targets") as err:
            Targets.from_dict(bad)
        assert len(str(err.value)) < 300 and "..." in str(err.value)
