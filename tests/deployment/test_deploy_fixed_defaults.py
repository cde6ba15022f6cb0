"""A deployed model refuses a value for a forward parameter that deploy fixed at its default
(the example left it unset), on both backends and after save_deployed / load; and every
deployed model, made or loaded, is in eval mode."""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import load_deployed, save_deployed
from compactnn.errors import CompactnnError


class OptNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, scale=None, shift: float = 0.5, mode="relu", *, temp=2.0):
        h = self.a(x)
        if scale is not None:
            h = h * scale
        h = torch.relu(h) if mode == "relu" else torch.tanh(h)
        return self.b(h + shift) / temp


@pytest.fixture(scope="module")
def qopt():
    torch.manual_seed(0)
    net = OptNet().eval()
    calib = torch.randn(64, 16)
    return compactnn.compress(net, "w8a8", calib_data=calib, progress=False), calib


BACKENDS = ["onednn", "onnxruntime"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((2.0,), {}, "scale=2.0"),
        ((), {"scale": 2.0}, "scale=2.0"),
        ((), {"mode": "tanh"}, "mode='tanh'"),
        ((), {"temp": 100.0}, "temp=100.0"),
        ((None, 0.7), {}, "shift=0.7"),
    ],
)
def test_a_value_for_a_fixed_parameter_is_refused(qopt, backend, args, kwargs, named):
    qmodel, calib = qopt
    d = compactnn.deploy(qmodel, backend, example=calib[:8])
    with pytest.raises(CompactnnError) as e:
        d(calib[:4], *args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "deploy again with" in msg
    assert "example=" in msg
    assert set(d.fixed) == {"scale", "shift", "mode", "temp"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_default_value_itself_is_accepted(qopt, backend):
    qmodel, calib = qopt
    d = compactnn.deploy(qmodel, backend, example=calib[:8])
    x = calib[:4]
    out = d(x)
    assert torch.equal(d(x, None, 0.5, "relu", temp=2.0), out)
    assert torch.equal(d(x, shift=0.5, temp=2), out)  # an equal number
    with torch.no_grad():
        assert (out - qmodel(x)).abs().max() < 0.05  # the simulation, defaults used


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_in_the_example_still_takes_any_value(qopt, backend):
    qmodel, calib = qopt
    x = calib[:8]
    d = compactnn.deploy(qmodel, backend, example=(x, torch.full((1, 32), 1.5)))
    assert "scale" not in d.fixed
    three = torch.full((1, 32), 3.0)
    with torch.no_grad():
        want = qmodel(x, three)
    assert (d(x, three) - want).abs().max() < 0.1 * want.abs().max()
    with pytest.raises(CompactnnError, match="mode='tanh'"):
        d(x, three, mode="tanh")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_parameters_survive_save_and_load_and_it_loads_in_eval_mode(qopt, backend, tmp_path):
    qmodel, calib = qopt
    d = compactnn.deploy(qmodel, backend, example=calib[:8])
    assert not any(m.training for m in d.modules())
    save_deployed(d, tmp_path / "a")
    for back in (
        load_deployed(tmp_path / "a", model=OptNet()),
        compactnn.load(tmp_path / "a", model=OptNet()),
    ):
        assert back.fixed == d.fixed
        assert not any(m.training for m in back.modules())
        with pytest.raises(CompactnnError, match=r"scale=2\.0"):
            back(calib[:4], 2.0)
