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
