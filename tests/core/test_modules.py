from torch import nn

from compactnn.core.modules import Targets, execution_order, select_modules, set_module


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
