"""Channel pruning through grouped convolutions: the count removed from each channel group
is rounded down, never up to a coarse whole group, and a layer whose share differs from the
ratio asked says so (ch30 removed 8 of 16 channels before)."""

import torch
from torch import nn

import compactnn
from compactnn.prune.channel import ChannelConfig, kept_per_channel_group
from tests.prune._channel_nets import quiet_compress


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.head(x.mean((2, 3)))


def test_ch30_through_grouped_convs_removes_a_quarter_not_half():
    torch.manual_seed(0)
    model = Grouped().eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q = quiet_compress(model, "ch30", x)
    # 4 channels per group at 0.3: 1 removed (25%), not 2 (50%) as rounding the kept count down
    assert (q.c1.out_channels, q.c2.out_channels, q.c3.out_channels) == (12, 24, 24)
    notes = compactnn.info_of(q)["notes"]
    said = [n for n in notes if "not the 30% asked" in n]
    assert len(said) == 3 and "c2 lost 25% of its output channels (8 of 32)" in said[1]


def test_kept_per_channel_group_never_exceeds_the_ratio_unless_none_would_go():
    keep = [kept_per_channel_group(4, ChannelConfig(ratio=r)) for r in (0.3, 0.5, 0.7, 0.1)]
    assert keep == [3, 2, 2, 4]  # 0.7 -> 2 removed (50%), not 3 (75%); 0.1 removes none
    assert kept_per_channel_group(2, ChannelConfig(ratio=0.3)) == 1  # nearest: 0.6 -> 1
