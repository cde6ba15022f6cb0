"""Structured channel removal: exactness, predicted counts, save/load, bad input."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig
from compactnn.prune.stats import count_macs, count_params
from compactnn.recipe import resolve_recipe


class Block(nn.Module):
    """conv-bn-relu, a residual add, a depthwise conv, a concat with a side branch, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(3, 4, 1)
        self.c3 = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))  # (N, 8, H, W)
        y = torch.relu(self.b2(self.c2(a))) + a  # residual add couples c1 and c2
        z = torch.cat([self.side(x), self.dw(y)], 1)  # (N, 4 + 8, H, W)
        return self.fc(torch.relu(self.c3(z)).mean((2, 3)))


def _zero_channels(model: Block, dead: list[int], dead3: list[int]) -> None:
    with torch.no_grad():
        for conv, bn in ((model.c1, model.b1), (model.c2, model.b2)):
            conv.weight[dead] = 0
            conv.bias[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0
        model.dw.weight[dead] = 0
        model.dw.bias[dead] = 0
        model.side.weight[[2]] = 0
        model.side.bias[[2]] = 0
        model.c3.weight[dead3] = 0
        model.c3.bias[dead3] = 0
        model.fc.weight[:, dead3] = 0  # the head's columns count in the channel's importance


def test_removing_zeroed_channels_through_add_concat_and_depthwise_keeps_outputs():
    # channels whose weights, biases and BN affine terms are zero output exactly zero;
    # L1 ranks them last, so removing them must leave the model's outputs unchanged
    torch.manual_seed(0)
    model = Block().eval()
    _zero_channels(model, [1, 6], [0, 5])
    x = torch.randn(4, 3, 6, 6)
    pruned = compactnn.compress(model, "ch25", calib_data=x, progress=False)
    assert pruned.c1.out_channels == 6 and pruned.c2.out_channels == 6
    assert pruned.dw.out_channels == 6 and pruned.dw.groups == 6
    assert pruned.side.out_channels == 3
    assert pruned.c3.in_channels == 9 and pruned.c3.out_channels == 6
    assert pruned.fc.in_features == 6 and pruned.fc.out_features == 5
    assert torch.allclose(pruned(x), model(x), atol=1e-5)


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def test_parameter_and_mac_counts_fall_as_predicted():
    model, x = _chain(), torch.randn(1, 2, 10, 10)
    pruned = compactnn.compress(model, "ch50", calib_data=x, progress=False)
    # widths 8 -> 4 and 16 -> 8; the head keeps its 10 outputs
    params = (4 * 2 * 9 + 4) + 2 * 4 + (8 * 4 * 9 + 8) + (10 * 8 + 10)
    macs = 8 * 8 * 4 * (2 * 9) + 6 * 6 * 8 * (4 * 9) + 10 * 8
    assert count_params(pruned) == params
    assert count_macs(pruned, x) == macs
    assert count_macs(model, x) == 8 * 8 * 8 * 18 + 6 * 6 * 16 * 72 + 160


def test_pruned_model_saves_and_loads_against_original_skeleton(tmp_path):
    model, x = _chain(), torch.randn(4, 2, 10, 10)
    recipe = compactnn.Recipe.from_yaml(
        "name: ch50-w8\nsteps:\n"
        "  - {method: channel, config: {ratio: 0.5, importance: l2}}\n"
        "  - {method: rtn, config: {weight: {bits: 8}}}\n"
    )
    pruned = compactnn.compress(model, recipe, calib_data=x, progress=False)
    compactnn.save(pruned, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=_chain())
    assert loaded[3].weight.shape == (8, 4, 3, 3)
    assert torch.equal(loaded(x), pruned(x))


def test_taylor_importance_runs_and_keeps_the_head():
    model, x = _chain(), torch.randn(8, 2, 10, 10)
    with pytest.warns(UserWarning, match=r"7 \(its output channels are the model's outputs\)"):
        pruned = compactnn.compress(model, "ch50-taylor", calib_data=x, progress=False)
    assert pruned[7].out_features == 10 and pruned[0].out_channels == 4


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.c1(x).mean((2, 3)).detach()
        return self.fc(h)


def test_untraceable_graph_names_where_it_breaks():
    with pytest.raises(
        CompactnnError, match=r"cannot trace the model: the output of 'c1'.*\.detach\(\)"
    ):
        compactnn.compress(Detached(), "ch50", calib_data=torch.randn(2, 1, 5, 5), progress=False)


class Crash(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.c1(x).mean((2, 3))
        if h.shape[1] != 4:
            raise RuntimeError("width changed")
        return self.fc(h)


def test_failure_inside_the_model_names_the_source_line():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CompactnnError, match=r"test_channel.py:\d+ `raise RuntimeError"):
            compactnn.compress(Crash(), "ch50", calib_data=torch.randn(2, 1, 5, 5), progress=False)


def test_mobilenet_v2_depthwise_blocks_prune_and_run():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = compactnn.compress(model, "ch30", calib_data=x, progress=False)
    assert pruned(x).shape == (1, 10)
    assert count_params(pruned) < 0.6 * count_params(model)


def test_short_name_builds_the_channel_step():
    recipe = resolve_recipe("ch30")
    assert recipe.steps[0].method == "channel"
    assert recipe.steps[0].config == ChannelConfig(ratio=0.3)
    assert resolve_recipe("ch50-taylor").steps[0].config.importance == "taylor"


def test_summary_gives_the_reason_the_step_skipped_the_output_layer():
    # the head is targeted but kept whole (its channels are the model's outputs): the
    # summary must say so, not call it untargeted, and not warn about it a second time
    x = torch.randn(2, 2, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = compactnn.compress(_chain(), "ch30", calib_data=x, progress=False)
    reason = compactnn.info_of(pruned)["float_layers"]["7"]
    assert reason == "channel pruning skipped it (its output channels are the model's outputs)"
    assert [str(w.message) for w in caught if "7 (" in str(w.message)] == [
        "channel pruning skipped: 7 (its output channels are the model's outputs)"
    ]
