"""Structured channel removal: exactness, predicted counts, save/load, bad input."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.prune.channel import ChannelConfig, pooled_keep
from compactnn.prune.stats import count_macs, count_params
from compactnn.recipe import resolve_recipe
from tests.prune._channel_nets import chain as _chain
from tests.prune._channel_nets import quiet_compress as _quiet_compress


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


@pytest.mark.filterwarnings("ignore:channel step")  # untrained, one sample: it may drift
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


def _seq_bn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def test_pruning_grows_with_the_ratio_and_every_layer_keeps_a_channel():
    # at 95% the 16-wide layer would keep int(0.8) = 0 channels, which torch-pruning refuses
    # silently (the layer stayed whole); at 97% both layers did
    x = torch.randn(4, 3, 8, 8)
    kept, widths = [], []
    for percent in (50, 90, 95, 97):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = compactnn.compress(_seq_bn(), f"ch{percent}", calib_data=x, progress=False)
        kept.append(count_params(pruned))
        widths.append((pruned[0].out_channels, pruned[3].out_channels))
        skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert skipped == [
            "channel pruning skipped: 8 (its output channels are the model's outputs)"
        ]
    assert widths == [(8, 16), (1, 3), (1, 1), (1, 1)]
    assert kept == sorted(kept, reverse=True) and kept[0] < count_params(_seq_bn())


def test_ratio_zero_is_refused():
    with pytest.raises(CompactnnError, match=r"removes nothing.*ch30"):
        resolve_recipe("ch0")
    assert ChannelConfig(ratio=0.0, heads=0.5).heads == 0.5  # heads alone is a real step


def test_round_to_larger_than_a_layer_says_so():
    # round_to=32 leaves no multiple of 32 below 16 or 32 channels; torch-pruning skipped
    # those groups silently and the reason blamed a residual add the model does not have
    config = ChannelConfig(ratio=0.5, round_to=32)
    recipe = compactnn.Recipe("ch50-r32", (compactnn.Step("channel", config),))
    pruned = _quiet_compress(_seq_bn(), recipe, torch.randn(4, 3, 8, 8))
    reasons = compactnn.info_of(pruned)["float_layers"]
    assert (
        reasons["0"] == "channel pruning skipped it (it has 16 channels, no more than round_to=32)"
    )
    assert (
        reasons["3"] == "channel pruning skipped it (it has 32 channels, no more than round_to=32)"
    )
    assert pruned[0].out_channels == 16


def test_a_layer_coupled_to_an_ignored_one_names_it():
    # c1 and c2 meet at a residual add: ignoring c2 keeps c1's channels, and the reason
    # names c2, not a generic coupling
    pruned = _quiet_compress(Block().eval(), "ch50", torch.randn(2, 3, 6, 6), ignore=["c2"])
    assert pruned.c1.out_channels == 8
    assert compactnn.info_of(pruned)["float_layers"]["c1"] == (
        "channel pruning skipped it (its channels are coupled (residual add, concat, shared "
        "or grouped conv) to 'c2', not pruned (not targeted by the step))"
    )


class Aliased(nn.Module):
    """One Linear registered under two names (``self.alias = self.b``) and run twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.alias = self.b

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.out(torch.relu(self.alias(h)))


def test_module_under_two_names_loads_resized_under_both(tmp_path):
    x = torch.randn(32, 16)
    pruned = _quiet_compress(Aliased(), "ch50", x)
    assert pruned.b.out_features == 16 and pruned.alias is pruned.b
    compactnn.save(pruned, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a", model=Aliased())
    assert loaded.alias is loaded.b and loaded.b.weight.shape == (16, 16)
    assert torch.equal(loaded(x), pruned(x))


class TwoBlocks(nn.Module):
    """stem + two residual blocks (c1 -> c2, added to the stream) + a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for c1, c2 in (self.convs[:2], self.convs[2:]):
            x = x + c2(torch.relu(c1(x)))
        return self.fc(x.mean((2, 3)))


def test_ignore_keeps_a_layers_whole_shape_and_its_producer_follows():
    # ignore= used to keep only the ignored layer's outputs: its inputs shrank with convs.0
    # (8, 8, 3, 3) -> (8, 4, 3, 3); now the layer feeding it keeps its channels too
    model, x = TwoBlocks().eval(), torch.randn(2, 3, 6, 6)
    pruned = _quiet_compress(model, "ch50", x, ignore=["convs.1"])
    assert torch.equal(pruned.convs[1].weight, model.convs[1].weight)
    assert torch.equal(pruned.convs[1].bias, model.convs[1].bias)
    assert pruned.convs[0].weight.shape == (8, 8, 3, 3)
    assert pruned.convs[2].weight.shape == (4, 8, 3, 3)  # the other block is still pruned
    assert pruned(x).shape == (2, 5)
    assert compactnn.info_of(pruned)["float_layers"]["convs.0"] == (
        "channel pruning skipped it (its output channels feed 'convs.1', kept whole "
        "(not targeted by the step))"
    )


def test_keep_whole_in_a_recipe_keeps_a_targeted_layer_and_bad_names_are_refused():
    model, x = TwoBlocks().eval(), torch.randn(2, 3, 6, 6)
    recipe = compactnn.Recipe.from_yaml(
        "name: ch50-whole\nsteps:\n"
        "  - {method: channel, config: {ratio: 0.5, keep_whole: [convs.3]}}\n"
    )
    pruned = _quiet_compress(model, recipe, x)
    assert torch.equal(pruned.convs[3].weight, model.convs[3].weight)
    assert pruned.convs[0].weight.shape == (4, 8, 3, 3)  # the first block is pruned
    assert compactnn.info_of(pruned)["float_layers"]["convs.3"] == (
        "channel pruning skipped it (named in keep_whole)"
    )
    config = ChannelConfig(ratio=0.5, keep_whole=("convs.9",))
    recipe = compactnn.Recipe("bad", (compactnn.Step("channel", config),))
    with pytest.raises(CompactnnError, match=r"keep_whole: 'convs.9' matches no module"):
        _quiet_compress(TwoBlocks().eval(), recipe, x)


def test_pooled_keep_floors_each_group_and_keeps_the_total():
    tiny, big = torch.tensor([0.3, 0.1, 0.2]), torch.arange(1.0, 9.0)
    # 11 channels at 0.5: 6 go; without the floor all of `tiny` would, now 2 of them do and
    # the budget's rest comes from `big`
    assert pooled_keep([tiny, big], 0.5) == ([1, 4], [0])
    assert pooled_keep([tiny, big], 0.2) == ([1, 7], [0])
    assert pooled_keep([big, tiny], 0.9) == ([1, 1], [1])  # the floors bound the total
    assert pooled_keep([tiny, big], 0.5, least=2) == ([2, 3], [0])
    assert pooled_keep([big, big + 4], 0.5) == ([2, 6], [])  # no floor binds: ranked as is


class Uneven(nn.Module):
    """Three convs and a head; conv ``b``'s weights are 1000x smaller than the others'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.b.weight.mul_(1e-3)
            self.b.weight[5].mul_(10)  # its most important channel
            self.c.weight[:, 5].mul_(10)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def test_global_ranking_keeps_a_channel_of_every_layer():
    # at 0.9 the pooled threshold lay above every channel of `a` (its group's importance is
    # the flattest): torch-pruning then kept `a` whole (8 channels) instead of its best one
    model, x = Uneven().eval(), torch.randn(4, 3, 8, 8)
    config = ChannelConfig(ratio=0.9, global_ranking=True)
    recipe = compactnn.Recipe("g90", (compactnn.Step("channel", config),))
    with pytest.warns(UserWarning, match=r"would remove every channel of a; each keeps its best"):
        pruned = compactnn.compress(model, recipe, calib_data=x, progress=False)
    assert [pruned.a.out_channels, pruned.b.out_channels, pruned.c.out_channels] == [1, 1, 1]
    assert torch.equal(pruned.b.bias, model.b.bias[5:6])  # b's best channel is the one kept
    assert pruned(x).shape == (4, 4)


def test_layers_kept_whole_keep_their_input_channels_too():
    # remove_channels(whole=...): the layers feeding those are not pruned either
    from compactnn.core.context import CompressContext
    from compactnn.prune.channel import remove_channels

    model, x = TwoBlocks().eval(), torch.randn(2, 3, 6, 6)
    targets = {n: m for n, m in model.named_modules() if n and n != "convs.1"}
    skipped = remove_channels(
        model, targets, ChannelConfig(ratio=0.5), CompressContext([x]), whole=("convs.1",)
    )
    assert model.convs[1].weight.shape == (8, 8, 3, 3)
    assert model.convs[2].weight.shape == (4, 8, 3, 3)
    assert skipped["convs.0"] == (
        "its output channels feed 'convs.1', kept whole (not targeted by the step)"
    )
