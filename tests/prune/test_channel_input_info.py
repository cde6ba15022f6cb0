"""Compressing a loaded pruned artifact again leaves the input's metadata as it was."""

import copy

import torch

import compactnn
from tests.prune._channel_nets import chain as _chain
from tests.prune._channel_nets import quiet_compress as _quiet_compress


def _loaded_ch50(tmp_path, x):
    compactnn.save(_quiet_compress(_chain(), "ch50", x), tmp_path / "ch50")
    return compactnn.load(tmp_path / "ch50", model=_chain())


def test_channel_pruning_a_pruned_artifact_leaves_the_input_info_and_both_reload(tmp_path):
    x = torch.randn(8, 2, 10, 10)
    ch = _loaded_ch50(tmp_path, x)
    extra = copy.deepcopy(compactnn.info_of(ch)["extra"])
    width = extra["resized"]["0"]["out_channels"]
    assert ch[0].weight.shape[0] == width < 8

    again = _quiet_compress(ch, "ch30", x)
    assert compactnn.info_of(ch)["extra"] == extra  # was rewritten to the ch30 widths
    assert again[0].weight.shape[0] < width == ch[0].weight.shape[0]
    compactnn.save(ch, tmp_path / "input")  # the input, saved again, still loads
    reloaded = compactnn.load(tmp_path / "input", model=_chain())
    assert torch.equal(reloaded(x), ch(x))
    compactnn.save(again, tmp_path / "again")
    assert torch.equal(compactnn.load(tmp_path / "again", model=_chain())(x), again(x))

    sparse = _quiet_compress(ch, "sp50", x)  # a later step on the same input
    assert compactnn.info_of(ch)["extra"] == extra  # no "magnitude" entry added to the input
    assert set(compactnn.info_of(sparse)["extra"]["pruning"]) == {"channel", "magnitude"}
    compactnn.save(sparse, tmp_path / "sparse")
    assert torch.equal(compactnn.load(tmp_path / "sparse", model=_chain())(x), sparse(x))
