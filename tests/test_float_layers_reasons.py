"""What compress says it left in float: recurrent layers (weights named weight_ih_l0, not
.weight) are reported with their reason, and the float-bytes warning says a layer cannot be
quantized (GRU, ConvTranspose2d) instead of advising to target it, in a unit that fits."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import compactnn


class RNNCls(nn.Module):
    def __init__(self, cls=nn.GRU) -> None:
        super().__init__()
        self.rnn = cls(8, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU())
        self.dec = nn.ConvTranspose2d(16, 64, 4, stride=2, padding=1)

    def forward(self, x):
        return self.dec(self.enc(x))


def _compress(model, recipe, x):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = compactnn.compress(model, recipe, calib_data=x, progress=False)
    return q, [str(w.message) for w in rec]


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_a_recurrent_layer_is_reported_kept_in_float_with_its_reason(cls):
    torch.manual_seed(0)
    q, said = _compress(RNNCls(cls).eval(), "w8a8", torch.randn(32, 8, 8))
    reason = compactnn.info_of(q)["float_layers"]["rnn"]
    assert reason == f"{cls.__name__} is not a quantizable layer type: recurrent weights " + (
        "weight_ih_l0, weight_hh_l0"
    )
    share = next(s for s in said if "stay in float" in s)
    assert f"rnn cannot be quantized by this recipe (rnn: {reason})" in share
    assert next(s for s in said if s.startswith("kept in float: rnn ("))
    assert "target those layers too" not in share
    assert "rnn.weight_hh_l0 (" in share and " KiB)" in share and "(0.0 MiB)" not in share


def test_a_targeted_layer_without_a_weight_attribute_is_recorded_by_split_supported():
    from compactnn.quant.base import split_supported, unquantizable_reason

    ctx = SimpleNamespace(float_layers={})
    gru, fc = nn.GRU(4, 8), nn.Linear(4, 2)
    assert split_supported({"rnn": gru, "fc": fc, "act": nn.ReLU()}, ctx) == {"fc": fc}
    assert ctx.float_layers == {"rnn": unquantizable_reason(gru)}


def test_a_conv_transpose_is_said_unquantizable_not_to_be_targeted():
    torch.manual_seed(0)
    _, said = _compress(AE().eval(), "w8a8", torch.randn(16, 1, 8, 8))
    share = next(s for s in said if "stay in float" in s)
    assert "dec cannot be quantized by this recipe (dec: ConvTranspose2d is not a " in share
    assert "target those layers too" not in share


def test_sizes_are_printed_in_a_unit_that_fits():
    from compactnn.float_layers import size_text

    assert [size_text(n) for n in (384, 12 * 1024, 5 * 2**20)] == [
        "384 bytes",
        "12.0 KiB",
        "5.0 MiB",
    ]


def test_a_small_conv_transpose_left_float_is_named_in_a_warning():
    """A U-Net's small upsampling ConvTranspose2d stayed float with no word in Python (only
    info_of said "not targeted by the recipe", as if a recipe could target it)."""

    class UNetish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Conv2d(1, 64, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(64, 4, 2, stride=2)
            self.head = nn.Conv2d(4, 64, 3, padding=1)

        def forward(self, x):
            return self.head(self.up(torch.relu(self.enc(x))))

    torch.manual_seed(0)
    q, said = _compress(UNetish().eval(), "w8a8", torch.randn(16, 1, 8, 8))
    reason = compactnn.info_of(q)["float_layers"]["up"]
    assert reason == "ConvTranspose2d is not a quantizable layer type"
    assert any(s.startswith("kept in float: up (ConvTranspose2d is not a") for s in said)
    assert not any("stay in float" in s for s in said)  # a small share of the bytes
