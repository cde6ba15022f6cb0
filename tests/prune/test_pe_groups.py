"""PE-wise pruning's layer check: every layer the PE tile does not fit, in one message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.pe_groups import misfit_message


class _DWSep(nn.Module):
    """Two depthwise convolutions: (1, 8) tiles fit neither."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dw1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU())
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.dw2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU())
        self.pw2 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw2(self.dw2(self.pw1(self.dw1(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


WANT = (
    "2 layers have channels the PE group (1, 8) does not divide (it must divide the output "
    "and input channels of each): 'dw1.0': weight shape (16, 1, 3, 3) has 16 output and 1 "
    "input channels; 'dw2.0': weight shape (32, 1, 3, 3) has 32 output and 1 input channels. "
    "Pick a group that divides them, or leave them in float: --ignore dw1.0 --ignore dw2.0 "
    "(compactnn compress/train), ignore=['dw1.0', 'dw2.0'] (compress/train in Python) or the "
    'step\'s targets: {ignore: ["dw1.0", "dw2.0"]}.'
)


@pytest.mark.parametrize("recipe", ["w2a8-pe50", "w2-pe50"])  # with and without calibration
def test_every_misfit_is_named_in_one_message_by_train_and_compress(recipe):
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    with pytest.raises(CompactnnError) as err:
        compactnn.train(_DWSep().eval(), recipe, (x, y), epochs=1, progress=False)
    assert str(err.value) == WANT
    with pytest.raises(CompactnnError) as err:
        compactnn.compress(_DWSep().eval(), recipe, calib_data=x, progress=False)
    assert str(err.value) == WANT
    q = compactnn.train(  # the fix it names trains
        _DWSep().eval(), recipe, (x, y), epochs=1, progress=False, ignore=["dw1.0", "dw2.0"]
    )
    assert isinstance(q.dw1[0], nn.Conv2d) and isinstance(q.dw2[0], nn.Conv2d)  # float
    assert set(q.pw2.weight_codes.unique().tolist()) <= {-1, 0, 1}


def test_one_misfit_reads_as_one_layer():
    text = misfit_message({"dw": (16, 1, 3, 3)}, (1, 8))
    assert text == (
        "layer 'dw' with weight shape (16, 1, 3, 3) has 16 output and 1 input channels; the "
        "PE group (1, 8) must divide both. Pick a group that divides it, or leave it in float: "
        "--ignore dw (compactnn compress/train), ignore=['dw'] (compress/train in Python) or "
        'the step\'s targets: {ignore: ["dw"]}.'
    )
