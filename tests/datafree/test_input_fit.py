"""An input shape the model cannot take: the message names the part at fault."""

import pytest
import torch
from torch import nn

from compactnn.datafree import generate
from compactnn.errors import CompactnnError


class Pooled(nn.Module):
    """Two 2x2 max pools, then a global mean: runs at 4x4 and larger."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("side", [1, 2, 3])
def test_a_size_too_small_is_named_with_the_smallest_that_runs(side):
    m = Pooled().eval()
    with pytest.raises(CompactnnError) as err:
        generate(m, 2, input_shape=(1, side, side), steps=1, progress=False)
    text = str(err.value)
    assert f"height x width {side}x{side} is too small for Pooled" in text
    assert "smallest square size it runs at is 4x4" in text
    assert "with C=" not in text  # the channels are right
    assert generate(m, 2, input_shape=(1, 4, 4), steps=1, progress=False).x.shape[2:] == (4, 4)


def test_a_flatten_model_at_another_size_is_told_the_size_it_takes():
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    with pytest.raises(CompactnnError, match=r"does not take 6x6 images; it takes \(N, 1, 8, 8\)"):
        generate(m, 2, input_shape=(1, 6, 6), steps=1, progress=False)


def test_wrong_channels_still_name_the_channels():
    with pytest.raises(CompactnnError, match=r"input_shape=\(3, 8, 8\) does not fit.*C=1"):
        generate(Pooled().eval(), 2, input_shape=(3, 8, 8), steps=1, progress=False)


def test_smallest_side_gives_up_past_the_limit():
    from compactnn.datafree.input_fit import smallest_side

    class Never(nn.Module):
        def forward(self, x):
            raise RuntimeError("never")

    assert smallest_side(Never(), torch.zeros(2, 1, 1, 1), limit=16) is None
